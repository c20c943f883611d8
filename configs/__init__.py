"""The default configs, installed as the package `protein_mlm.configs` (see pyproject.toml) so that a wheel or a
`pip install .` carries them; `protein-mlm-configs <dir>` copies them out for local editing."""
