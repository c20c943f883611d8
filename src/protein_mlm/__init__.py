"""Masked-language-model pretraining of ESM-style protein transformers."""

import os

# Nothing in this package downloads: models are built from configs and the data ships with it.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
