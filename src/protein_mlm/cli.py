"""The `@hydra.main` edge: find the configs, check the command line before Hydra runs, report user errors.

Hydra prints multi-line errors (and tracebacks, e.g. for a run dir it cannot create) before any project
code runs. So the overrides are composed and checked here first; a bad one ends with one line and exit 2.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, UserError

EXIT_USER_ERROR = 2


def find_config_dir() -> Path:
    """configs/ of the checkout (editable install), or $PROTEIN_MLM_CONFIGS, or ./configs."""
    candidates = [os.environ.get("PROTEIN_MLM_CONFIGS"), Path(__file__).resolve().parents[2] / "configs", "configs"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return Path(candidate).resolve()
    raise SystemExit("error: cannot find the configs/ directory; run from the project root or set PROTEIN_MLM_CONFIGS")


CONFIG_DIR = find_config_dir()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def _one_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "Set the environment"))]
    return " ".join(lines)


def compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose like Hydra will, turning composition errors into one-line ConfigErrors."""
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{_one_line(e)} (list groups and keys with --help / --cfg job)") from None


def make_run_dir(requested: str, explicit: bool) -> str:
    """Create the run dir now; a default one gets a -1, -2 … suffix when a run in the same second took it."""
    base = Path(requested)
    candidates = [base] if explicit else [base] + [Path(f"{base}-{i}") for i in range(1, 1000)]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=explicit)
        except FileExistsError:
            continue
        except OSError as e:
            raise ConfigError(
                f"cannot create the run dir {path} ({e.strerror}); choose a writable hydra.run.dir or paths.log_dir"
            ) from None
        if explicit and any(path.iterdir()):
            raise ConfigError(
                f"run dir {path} already holds files; choose a new hydra.run.dir so nothing is overwritten"
            )
        return str(path)
    raise ConfigError(f"too many runs named {base}-N; choose another hydra.run.dir")


def prepare_argv(config_name: str, argv: list[str], check) -> list[str]:
    """Check a single run's overrides and pin its (unique, created) run dir; leave flags to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return argv  # --multirun, --help, --cfg …: Hydra's own modes
    cfg = compose_checked(config_name, argv)
    check(cfg)
    explicit = any(arg.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for arg in argv)
    run_dir = make_run_dir(cfg.hydra.run.dir, explicit)
    return [a for a in argv if a.split("=", 1)[0].lstrip("+~") != "hydra.run.dir"] + [f"hydra.run.dir={run_dir}"]


def run(config_name: str, task, check) -> None:
    """Run `task(cfg)` under `@hydra.main` with one-line errors for anything the user can fix."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig):
        try:
            return task(cfg)
        except UserError as e:
            fail(str(e))

    try:
        sys.argv = sys.argv[:1] + prepare_argv(config_name, sys.argv[1:], check)
    except UserError as e:
        fail(str(e))
    _main()


def train_main() -> None:
    """Entry point of `python train.py` and the `protein-mlm-train` console script."""
    from .train import check_config, train

    run("train", train, check_config)
