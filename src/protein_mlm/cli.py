"""The command-line edge: compose and check a run once, before anything is written, and run it on that config;
report user errors in one line (exit 2).

Hydra prints multi-line errors (and tracebacks, e.g. for a run dir it cannot create) before any project code
runs; so a single run is composed and checked here and handed to Hydra's job runner as composed (run dir,
logging, .hydra/ record), never composed a second time. Sweeps and Hydra's own modes (--help, --cfg) go to
`@hydra.main`, each sweep job checking itself.
"""

import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.callbacks import Callbacks
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import run_job
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from protein_mlm.composition import CONFIG_DIR, compose_checked, one_line, packaged_configs
from protein_mlm.errors import STORAGE_ERRORS, ConfigError, Preempted, TrainingDiverged, UserError, fail
from protein_mlm.launch import distributed_rank, launched_together, shared_run_id, slurm_batch_job, slurm_restarted
from protein_mlm.overrides import override_key
from protein_mlm.reporting.summary import write_status
from protein_mlm.resume import resume_run
from protein_mlm.sweep import expand_sweep, job_dir_name, threads_per_parallel_job, warn_short_validation

__all__ = ["CONFIG_DIR", "compose_checked", "resume_run"]  # for callers of the edge (preview.py, tests)

log = logging.getLogger(__name__)

ENDINGS = ((TrainingDiverged, "diverged"), (Preempted, "preempted"))  # status.json of a run ended by one

# hydra.sweep.subdir: jobs are named by the values of the swept keys only, e.g. scheduler.warmup_steps=1000
OmegaConf.register_new_resolver(
    "job_dir_name", lambda overrides, num: job_dir_name(list(overrides), int(num)), replace=True
)


def copy_configs_main() -> None:
    """`protein-mlm-configs [DIR]`: copy the packaged configs to DIR (./configs), which then take precedence."""
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "configs")
    if target.exists():
        fail(f"{target} exists already; pass a new directory (e.g. protein-mlm-configs my_configs)")
    shutil.copytree(packaged_configs(), target, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    print(
        f"copied the configs to {target}; runs from {target.parent.resolve()} use them "
        f"(elsewhere: PROTEIN_MLM_CONFIGS={target.resolve()})"
    )


# What another rank's Hydra may have written into the shared run dir before rank 0 checks it: its log file.
RANK_OUTPUT = re.compile(r"\w+_ddp_process_\d+\.log")


def make_run_dir(requested: str, explicit: bool, reuse: bool = False) -> str:
    """Create the run dir now; a default one gets a -1, -2 … suffix when a run in the same second took it. `reuse`:
    a requeued job's dir that holds no checkpoint yet (its earlier attempt's files only) starts the run there."""
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
        if explicit and not reuse and any(not RANK_OUTPUT.fullmatch(p.name) for p in path.iterdir()):
            raise ConfigError(
                f"run dir {path} already holds files; choose a new hydra.run.dir so nothing is overwritten"
            )
        return str(path)
    raise ConfigError(f"too many runs named {base}-N; choose another hydra.run.dir")


def check_sweep(config_name: str, overrides: list[str], check) -> None:
    """Compose and check every job of a grid sweep first, so a typo fails in one line, not in every job."""
    try:
        combos, swept = expand_sweep(overrides)
    except Exception:  # interval/range sweeps of search sweepers: leave them to Hydra
        return
    jobs = []
    for combo in combos:
        cfg = compose_checked(config_name, combo)
        check(cfg)
        check_multirun_processes(cfg)
        if "trainer" in cfg:
            last = {override_key(o): o for o in combo if override_key(o) in swept}  # a later override of a key wins
            name = job_dir_name(list(last.values()), 0)
            jobs.append((name, cfg.trainer.max_steps, cfg.trainer.get("val_check_interval")))
    warn_short_validation(jobs)


def check_multirun_processes(cfg: DictConfig) -> None:
    """Lightning starts DDP processes by re-running the command line: under `-m` that would re-run the sweep."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    several = (devices > 1 if isinstance(devices, int) else OmegaConf.is_list(devices) and len(devices) > 1) or (
        trainer.get("num_nodes", 1) > 1
    )
    if several and "SlurmLauncher" not in str(cfg.hydra.launcher.get("_target_", "")):
        raise ConfigError(
            f"a multirun (-m) job with trainer.devices={devices} x num_nodes={trainer.get('num_nodes', 1)} cannot "
            "run on this launcher (Lightning would re-run the whole sweep in every DDP process); run the jobs one "
            "at a time, or submit them with hydra/launcher=slurm"
        )


def prepare_run(config_name: str, argv: list[str], check) -> tuple[DictConfig | None, Any]:
    """Compose a single run once, check it (rank 0) and pin its created run dir. Returns the config to run and what
    the check returned (its plan) for the task; (None, None) leaves the command line to `@hydra.main`: sweeps (each
    job checks itself, and may run on another machine) and Hydra's own modes. Other ranks follow rank 0's run dir
    unchecked (the task checks them)."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if flags and set(flags) <= {"-m", "--multirun"}:
        check_sweep(config_name, [arg for arg in argv if arg not in flags], check)
        return None, None
    if flags:
        return None, None  # --help, --cfg, --info …: Hydra's own modes
    argv = requeued_argv(shared_run_dir(config_name, argv))
    rank = distributed_rank()
    if rank > 0:
        argv = peer_argv(argv)
    resume = [arg for arg in argv if override_key(arg) == "resume"]
    if resume:
        cfg = resume_run(resume[-1].split("=", 1)[1], argv, config_name)
        return cfg, (check(cfg) if rank == 0 else None)
    cfg = compose_checked(config_name, argv)
    if rank > 0:
        return cfg, None
    checked = check(cfg)
    if cfg.hydra.get("mode") == RunMode.MULTIRUN:  # e.g. hparams_search=optuna: jobs go to the sweep dir
        return None, None
    explicit = any(override_key(arg) == "hydra.run.dir" for arg in argv)
    with open_dict(cfg):
        cfg.hydra.run.dir = make_run_dir(cfg.hydra.run.dir, explicit, reuse=slurm_restarted())
    return cfg, checked


def requeued_checkpoint(run_dir: str | Path) -> Path | None:
    """In a requeued SLURM job: the last.ckpt its earlier attempt left in `run_dir`, which the job continues from."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    return last if slurm_restarted() and last.is_file() else None


def requeued_argv(argv: list[str]) -> list[str]:
    """A requeued SLURM job runs its byte-identical command again: where its run dir holds last.ckpt, continue as
    `resume=<run dir>` would (never start over in it); where it holds none, the run starts there."""
    run_dir = next((a.split("=", 1)[1] for a in reversed(argv) if override_key(a) == "hydra.run.dir"), None)
    if run_dir is None or any(override_key(a) == "resume" for a in argv) or not requeued_checkpoint(run_dir):
        return argv
    log.info("requeued SLURM job %s: continuing from %s/checkpoints/last.ckpt", os.environ["SLURM_JOB_ID"], run_dir)
    # The command is the one the run dir's overrides were saved from: resume= replays them (given twice, an
    # override that adds a key, +key=..., would be refused).
    return [f"resume={run_dir}"]


def continue_requeued_job(cfg: DictConfig) -> None:
    """The same for a job submitit requeued (hydra/launcher=slurm): it runs the job's pickled config again, so the
    run continues from its dir's last.ckpt unless a checkpoint was given."""
    last = requeued_checkpoint(cfg.paths.output_dir) if cfg.get("ckpt_path") is None else None
    if last is not None:
        log.info("requeued SLURM job %s: continuing from %s", os.environ["SLURM_JOB_ID"], last)
        with open_dict(cfg):
            cfg.ckpt_path = str(last)


def shared_run_dir(config_name: str, argv: list[str]) -> list[str]:
    """Processes started by torchrun or srun must all name the same run dir: a default one resolves `${now}` in
    each process (on each node), so it comes from the launcher's job id (SLURM, torchrun --rdzv-id) or is given.
    A SLURM batch job names it by its job id even as one process, so a requeue of the job finds it again."""
    together = launched_together() or slurm_batch_job()
    if not together or any(override_key(a) in ("hydra.run.dir", "resume") for a in argv):
        return argv
    run_id = shared_run_id()
    if run_id is None:
        raise ConfigError(
            "processes started by torchrun need one run dir for all of them (and all nodes): pass hydra.run.dir=<a "
            "dir on the shared filesystem> (or torchrun --rdzv-id=<id>, which names it)"
        )
    return [*argv, f"hydra.run.dir={compose_checked(config_name, argv).paths.log_dir}/{run_id}"]


def peer_argv(argv: list[str]) -> list[str]:
    """A rank > 0 started by torchrun or srun (not by Lightning, which pins all of this itself): Hydra's output for
    this rank as Lightning names it (its log file; no second .hydra/)."""
    if any(override_key(a) == "hydra.output_subdir" and a.endswith("=null") for a in argv):
        return argv  # a child Lightning started: rank 0's command line, pinned already
    rank = distributed_rank()
    kept = [a for a in argv if override_key(a) not in ("hydra.job.name", "hydra.output_subdir")]
    return [*kept, f"hydra.job.name=train_ddp_process_{rank}", "hydra.output_subdir=null"]


def run_task(task, cfg: DictConfig, checked: Any = None) -> float:
    """Run one job, with the plan the CLI's check made (`task(cfg, checked)`; `task(cfg)` checks itself).
    A single run fails loudly (one line for user errors); a multirun job records the failure in its status.json
    and returns +inf, so the sweep goes on and a sweeper can rank it."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and cfg.get("num_threads") is None:
        with open_dict(cfg):
            cfg.num_threads = threads_per_parallel_job(HydraConfig.get().launcher)
    try:
        try:
            metrics = task(cfg) if checked is None else task(cfg, checked)
        except OSError as e:
            if e.errno not in STORAGE_ERRORS:
                raise
            raise UserError(
                f"cannot write {e.filename or 'a file'} ({e.strerror}); free space or choose a writable "
                "paths.log_dir / paths.cache_dir (checkpoints written before are intact; resume= continues)"
            ) from None
    except Exception as e:
        status = next((name for kind, name in ENDINGS if isinstance(e, kind)), "failed")
        if distributed_rank() == 0 and Path(cfg.paths.output_dir).is_dir():
            write_status(cfg.paths.output_dir, status, step=getattr(e, "step", None), message=one_line(e))
        if not multirun:
            if isinstance(e, UserError):
                fail(str(e))
            raise
        log.error("job %s: %s", status, one_line(e))
        return math.inf
    return metrics.get("val/best_loss", math.inf)


def run(config_name: str, task, check) -> None:
    """Run `task` on the config composed and checked once, here, with one-line errors for anything the user can
    fix; what `check` returned (the plan) goes to the task. Sweeps and Hydra's own modes run under `@hydra.main`."""
    try:
        cfg, checked = prepare_run(config_name, sys.argv[1:], check)
    except UserError as e:
        fail(str(e))
    if cfg is None:
        hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(
            lambda job_cfg: run_task(task, job_cfg)
        )()
        return
    run_composed(cfg, lambda job_cfg: run_task(task, job_cfg, checked))


def run_composed(cfg: DictConfig, task_function) -> None:
    """Hydra's single-run path (`Hydra.run`) on a config already composed: the run dir, logging, the .hydra/ record
    and `HydraConfig` (Lightning's DDP launcher reads it) as `@hydra.main` sets them, without composing again."""
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=cfg.hydra.job.config_name)
    context = HydraContext(config_loader=None, callbacks=callbacks)
    job = run_job(task_function, cfg, job_dir_key="hydra.run.dir", job_subdir_key=None, hydra_context=context)
    callbacks.on_run_end(config=cfg, config_name=cfg.hydra.job.config_name, job_return=job)
    _ = job.return_value  # re-raises the task's exception


def train_main() -> None:
    """Entry point of `python train.py` and the `protein-mlm-train` console script."""
    from protein_mlm.preflight import check_config
    from protein_mlm.train import train

    def train_job(cfg: DictConfig, plan: Any = None) -> dict[str, float]:
        continue_requeued_job(cfg)  # a multirun job (submitit) that SLURM requeued
        return train(cfg, plan)

    run("train", train_job, check_config)


def eval_main() -> None:
    """Entry point of `python eval.py` and the `protein-mlm-eval` console script."""
    from protein_mlm.inference.evaluate import check_eval_config, evaluate

    run("eval", evaluate, check_eval_config)
