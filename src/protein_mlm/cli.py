"""The `@hydra.main` edge: find the configs, check the command line before Hydra runs, report user errors.

Hydra prints multi-line errors (and tracebacks, e.g. for a run dir it cannot create) before any project
code runs. So the overrides are composed and checked here first; a bad one ends with one line and exit 2.
"""

import importlib.resources
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from protein_mlm.errors import STORAGE_ERRORS, ConfigError, Preempted, TrainingDiverged, UserError, fail
from protein_mlm.launch import distributed_rank, launched_together, shared_run_id, slurm_batch_job, slurm_restarted
from protein_mlm.overrides import nearest_key, override_key
from protein_mlm.reporting.summary import write_status
from protein_mlm.sweep import expand_sweep, job_dir_name, threads_per_parallel_job, warn_short_validation

log = logging.getLogger(__name__)

ENDINGS = ((TrainingDiverged, "diverged"), (Preempted, "preempted"))  # status.json of a run ended by one

# hydra.sweep.subdir: jobs are named by the values of the swept keys only, e.g. scheduler.warmup_steps=1000
OmegaConf.register_new_resolver(
    "job_dir_name", lambda overrides, num: job_dir_name(list(overrides), int(num)), replace=True
)


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


CONFIG_DIR = find_config_dir()


def _one_line(error: BaseException) -> str:
    """An exception's message on one line, without OmegaConf's key/type trailer lines."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "Set the environment"))]
    return " ".join(lines) or type(error).__name__


def compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose like Hydra will, turning composition errors into one-line ConfigErrors."""
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_unknown_key_message(config_name, overrides, e) or f"{_one_line(e)} (see --help)") from None


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


def resume_argv(argv: list[str]) -> list[str]:
    """`resume=<run dir>`: that run's overrides, then the new ones, continuing from its last.ckpt in the same
    dir (so the same TensorBoard run); Hydra writes this invocation's config to .hydra/resume-<time>/."""
    run_dir = Path(next(a for a in reversed(argv) if override_key(a) == "resume").split("=", 1)[1])
    last = run_dir / "checkpoints" / "last.ckpt"
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not last.is_file() or not overrides_file.is_file():
        raise ConfigError(
            f"resume={run_dir} is not a run dir with checkpoints/last.ckpt and .hydra/overrides.yaml; "
            "pass the dir of a train.py run that saved a checkpoint (or use ckpt_path=<file>)"
        )
    pinned = {"resume", "ckpt_path", "hydra.run.dir", "hydra.output_subdir"}
    saved = OmegaConf.to_container(OmegaConf.load(overrides_file), resolve=False)  # keep ${...} as written
    original = [str(o) for o in saved if override_key(str(o)) not in pinned]
    new = [a for a in argv if override_key(a) not in pinned]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [
        *original,
        *resolved_at_start(run_dir),
        *new,
        f"ckpt_path={last}",
        f"hydra.run.dir={run_dir}",
        f"hydra.output_subdir=.hydra/resume-{stamp}",
    ]


def resolved_at_start(run_dir: Path) -> list[str]:
    """What `data.packing=auto` resolved to when the run started (its config.yaml), so a resume on another machine
    trains the batches it started with."""
    saved = run_dir / "config.yaml"
    packing = OmegaConf.select(OmegaConf.load(saved), "data.packing") if saved.is_file() else None
    return [f"data.packing={str(packing).lower()}"] if isinstance(packing, bool) else []


def check_saved_overrides(config_name: str, argv: list[str]) -> None:
    """A run dir's saved overrides must still compose (a key renamed or removed since the run started)."""
    run_dir = Path(next(a for a in argv if override_key(a) == "hydra.run.dir").split("=", 1)[1])
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"), resolve=False)
    try:
        compose_checked(config_name, [str(o) for o in saved])
    except ConfigError as e:
        raise ConfigError(
            f"resume={run_dir}: an override saved in {run_dir}/.hydra/overrides.yaml no longer fits this version: {e}"
        ) from None


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


def prepare_argv(config_name: str, argv: list[str], check) -> tuple[list[str], Any]:
    """Check a single run's overrides and pin its (unique, created) run dir; leave flags to Hydra. Returns the
    command line for Hydra and what the check returned for the run (its plan), to hand to the task; None where
    each job checks itself: sweeps (a job may run on another machine), Hydra's own modes and DDP children."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if flags and set(flags) <= {"-m", "--multirun"}:
        check_sweep(config_name, [arg for arg in argv if arg not in flags], check)
        return argv, None
    if flags:
        return argv, None  # --help, --cfg, --info …: Hydra's own modes
    argv = requeued_argv(shared_run_dir(config_name, argv))
    if distributed_rank() > 0:
        # Another rank: rank 0 checks the config and creates (and checks) the run dir; this one only follows it.
        return peer_argv(argv), None
    if any(override_key(arg) == "resume" for arg in argv):
        argv = resume_argv(argv)
        check_saved_overrides(config_name, argv)
        return argv, check(compose_checked(config_name, argv))
    cfg = compose_checked(config_name, argv)
    checked = check(cfg)
    if cfg.hydra.get("mode") == RunMode.MULTIRUN:  # e.g. hparams_search=optuna: jobs go to the sweep dir
        return argv, None
    explicit = any(override_key(arg) == "hydra.run.dir" for arg in argv)
    run_dir = make_run_dir(cfg.hydra.run.dir, explicit, reuse=slurm_restarted())
    return [a for a in argv if override_key(a) != "hydra.run.dir"] + [f"hydra.run.dir={run_dir}"], checked


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
    """A rank > 0 started by torchrun or srun (not by Lightning, which pins all of this itself): rank 0's resume
    rewrite, and Hydra's output for this rank as Lightning names it (its log file; no second .hydra/)."""
    if any(override_key(a) == "resume" for a in argv):
        argv = resume_argv(argv)
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
            write_status(cfg.paths.output_dir, status, step=getattr(e, "step", None), message=_one_line(e))
        if not multirun:
            if isinstance(e, UserError):
                fail(str(e))
            raise
        log.error("job %s: %s", status, _one_line(e))
        return math.inf
    return metrics.get("val/best_loss", math.inf)


def run(config_name: str, task, check) -> None:
    """Run `task(cfg)` under `@hydra.main` with one-line errors for anything the user can fix; the config is
    checked once, here, and what `check` returned goes to the task (Hydra composes the same command line)."""
    checked = None

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> float:
        return run_task(task, cfg, checked)

    try:
        argv, checked = prepare_argv(config_name, sys.argv[1:], check)
    except UserError as e:
        fail(str(e))
    sys.argv = sys.argv[:1] + argv
    _main()


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
