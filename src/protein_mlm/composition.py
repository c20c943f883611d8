"""Where the configs live and how a command line composes into one config, with one-line errors."""

import importlib.resources
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from protein_mlm.errors import ConfigError
from protein_mlm.overrides import nearest_key, override_key


def packaged_configs() -> Path:
    """The configs installed with the package (configs/ of the checkout under an editable install)."""
    return Path(str(importlib.resources.files("protein_mlm.configs")))


def find_config_dir() -> Path:
    """$PROTEIN_MLM_CONFIGS, else ./configs when it holds train.yaml (a local copy to edit), else the packaged set."""
    for candidate in (os.environ.get("PROTEIN_MLM_CONFIGS"), "configs"):
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return Path(candidate).resolve()
    if os.environ.get("PROTEIN_MLM_CONFIGS"):
        raise SystemExit(f"error: PROTEIN_MLM_CONFIGS={os.environ['PROTEIN_MLM_CONFIGS']} holds no train.yaml")
    return packaged_configs()


CONFIG_DIR = find_config_dir()


def one_line(error: BaseException) -> str:
    """An exception's message on one line, without OmegaConf's key/type trailer lines."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "Set the environment"))]
    return " ".join(lines) or type(error).__name__


def compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose like Hydra does (the Hydra node included), turning composition errors into one-line ConfigErrors."""
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_unknown_key_message(config_name, overrides, e) or f"{one_line(e)} (see --help)") from None


def _unknown_key_message(config_name: str, overrides: list[str], error: BaseException) -> str | None:
    """For an override of a key that does not exist: name it and the nearest existing key."""
    match = re.search(r"Could not override '([^']+)'", str(error))
    if not match:
        return None
    key = match.group(1)
    rest = [o for o in overrides if override_key(o) != key]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=rest)
    except (HydraException, OmegaConfBaseException):
        return None
    near = nearest_key(key, OmegaConf.to_container(cfg, resolve=False))
    hint = f"did you mean {near}?" if near else "list the keys with --cfg job"
    return f"{key} is not a config key; {hint} (to add a new key on purpose, write +{key}=...)"
