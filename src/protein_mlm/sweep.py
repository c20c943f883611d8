"""Multirun sweeps: job directory names, checks before a sweep starts, and the Hydra callback
that keeps the sweep's summary (summary.py) up to date."""

import hashlib
import itertools
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from protein_mlm.overrides import override_key
from protein_mlm.reporting.summary import write_summary

log = logging.getLogger(__name__)

SWEPT_KEYS_ENV = "PROTEIN_MLM_SWEPT_KEYS"  # set at sweep start, read when each job's dir is named


def swept_keys(overrides: list[str], sweeper_params: dict[str, Any] | None = None) -> list[str]:
    """Keys a multirun varies: overrides with sweep syntax (a,b / range() / choice()) and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return sorted(set(keys) | set(sweeper_params or {}))


def expand_sweep(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """Every combination of a multirun-style override list, and the keys that vary (as Hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    options, swept = [], []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            options.append([f"{key}={value}" for value in override.sweep_string_iterator()])
            swept.append(key)
        else:
            options.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(combo) for combo in itertools.product(*options)], swept


def job_dir_name(job_overrides: list[str], job_num: int) -> str:
    """A job's sub-directory: its values of the swept keys (`scheduler.warmup_steps=1000`), file-system safe."""
    swept = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
    chosen = [o for o in job_overrides if override_key(o) in swept] if swept else list(job_overrides)
    name = ",".join(sorted(chosen)).replace("/", "_") or f"job{job_num}"
    if len(name) > 120:  # stay far below the 255-byte file-name limit; the hash keeps names unique
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def warn_short_validation(jobs: list[tuple[str, int, Any]]) -> None:
    """Warn once when a job (name, max_steps, val_check_interval) validates fewer than 3 times."""
    from protein_mlm.plan import validation_steps  # here: plan.py imports torch, which the CLI's start skips

    short = [(name, len(validation_steps(steps, interval))) for name, steps, interval in jobs]
    short = [(name, n) for name, n in short if n < 3]
    if short:
        name, n = short[0]
        log.warning(
            "%d of %d jobs validate fewer than 3 times (e.g. %s: %d); their val/loss curves will be single points. "
            "Lower trainer.val_check_interval (counted in optimizer steps) to compare them",
            len(short),
            len(jobs),
            name or "the job",
            n,
        )


class SweepSummaryCallback(Callback):
    """Hydra callback: names multirun jobs by their swept values, and keeps summary.csv/.md/.png up to date."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params")  # set by search sweepers such as Optuna
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(list(config.hydra.overrides.task), params))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._summarize(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if self._summarize(sweep_dir) is not None:
            print(f"\nSweep summary ({sweep_dir}/summary.md, summary.csv, summary.png):")
            print((sweep_dir / "summary.md").read_text())
            print(f"View every job's curves: tensorboard --logdir {sweep_dir}", flush=True)

    @staticmethod
    def _summarize(sweep_dir: str):
        try:
            return write_summary(sweep_dir)
        except Exception as e:  # a summary problem must never end the sweep
            log.warning("could not write the sweep summary: %s", e)
            return None


def threads_per_parallel_job(launcher: DictConfig) -> int | None:
    """CPU threads per job when the joblib launcher runs several at once, so jobs x threads <= cores."""
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    cores = os.cpu_count() or 1
    n_jobs = launcher.get("n_jobs") or -1
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
    return max(1, cores // parallel)
