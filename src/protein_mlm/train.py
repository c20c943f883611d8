"""`train(cfg, plan)`: compose the objects a config describes, fit, and report. No `@hydra.main` here."""

import logging
import math
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from protein_mlm.errors import Preempted
from protein_mlm.launch import launched_together
from protein_mlm.plan import RunPlan, plan_rows, record_resolved
from protein_mlm.preflight import check_config
from protein_mlm.reporting.console import route_records, silence_lightning_noise
from protein_mlm.reporting.lr_plan import audit_logged_lrs, planned_lrs, plot_lr_curves
from protein_mlm.reporting.summary import write_status
from protein_mlm.reporting.tables import print_config_tree, print_plan, print_summary
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.training.metering import ThroughputMeter
from protein_mlm.training.module import MaskedLMModule
from protein_mlm.training.stopping import REQUEUE_SIGNALS, STOP, requeue, slurm_job_id

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    """False in the other processes of a distributed run (Lightning's DDP children, SLURM tasks > 0)."""
    return rank_zero_only.rank == 0


def build_module(cfg: DictConfig, plan: RunPlan) -> MaskedLMModule:
    return MaskedLMModule(
        architecture=OmegaConf.to_container(cfg.model.architecture, resolve=True),
        optimizer=instantiate(plan.optimizer),
        schedule=plan.schedule,
        lr_scheduler=plan.lr_scheduler,
        no_decay_bias_and_norm=plan.no_decay_bias_and_norm,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        init_from=cfg.model.get("init_from"),
        activation_checkpointing=cfg.model.get("activation_checkpointing", False),
        compile=plan.compile,
        static_shapes=plan.packing,
        fast_layers=cfg.model.get("fast_layers", False),
        inject_nan_at_step=cfg.faults.inject_nan_at_step,
        loss_divisor=plan.loss_divisor,
    )


def build_datamodule(cfg: DictConfig, plan: RunPlan):
    """The configured DataModule with the plan's resolution of `auto` values."""
    return instantiate(cfg.data, packing=plan.packing, num_workers=plan.num_workers)


def unused_path(path: Path) -> Path:
    """`path`, or `<stem>-resume-N<suffix>` when it exists already."""
    n = 0
    while path.exists():
        n += 1
        path = path.with_name(f"{path.stem.split('-resume-')[0]}-resume-{n}{path.suffix}")
    return path


def audit_run(plan: RunPlan, run_dir: Path, steps_done: int) -> str:
    """Compare the LR logged at every step with the planned curve; warn when they differ."""
    scalars = read_scalars(run_dir)
    name = plan.lr_scheduler.get("name")  # the LR monitor's tag
    tags = [t for t in scalars if t == name or t.startswith(f"{name}/")]
    if not tags:
        return "skipped (no LR logged to TensorBoard)"
    planned = planned_lrs(plan.schedule, plan.peak_lr, steps_done)
    problem = audit_logged_lrs(scalars[tags[0]], planned)
    if problem is None:
        return "ok"
    log.warning(
        "LR audit: the logged LR does not follow the planned schedule (%s); is the scheduler stepped per "
        "optimizer step (scheduler.interval=step)? See %s/lr_schedule.png",
        problem,
        run_dir,
    )
    return problem


def trainer_plugins(cfg: DictConfig) -> list:
    """The configured plugins; under SLURM also Lightning's SLURM environment without its auto-requeue, so its
    SIGUSR1 handler and `hpc_ckpt_N.ckpt` files never make a second checkpoint family beside last.ckpt."""
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    # Lightning's own choice first: torchrun inside a SLURM job keeps TorchElasticEnvironment.
    slurm = SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()
    if slurm and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def stopped(trainer: pl.Trainer, run_dir: Path, signum: int) -> Preempted:
    """The run stopped for a stop signal (its last.ckpt saved): requeue the job on rank 0 where the signal asks for
    it, and say how it continues."""
    name, step = signal.Signals(signum).name, trainer.global_step
    saved = (run_dir / "checkpoints" / "last.ckpt").is_file()
    what = "saved checkpoints/last.ckpt" if saved else "before its first update, nothing saved"
    message = f"stopped by {name} after step {step}; {what}"
    if trainer.is_global_zero and signum in REQUEUE_SIGNALS:
        write_status(run_dir, "preempted", step=step, message=message)  # submitit's requeue exits the process
        message += f"; {requeue(signum)}"
    then = f"continue with resume={run_dir}" if saved else "start it again"
    if slurm_job_id() is not None:
        then += " (a requeued SLURM job does so by itself)"
    return Preempted(step, f"{message}; {then}")


def train(cfg: DictConfig, plan: RunPlan | None = None) -> dict[str, float]:
    """Train as the config says, by the plan `check_config(cfg)` made (the CLI's; made here when not given);
    return the final validation metrics."""
    silence_lightning_noise()
    route_records()
    STOP.install()  # from here on a stop signal is remembered, not fatal: the run stops at its first chance
    try:
        return _train(cfg, plan)
    finally:
        STOP.uninstall()


def _train(cfg: DictConfig, plan: RunPlan | None) -> dict[str, float]:
    plan = plan or check_config(cfg)  # checked and resolved once; everything below reads `plan`
    started = time.monotonic()
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    record_resolved(cfg, plan)  # config.yaml records what every `auto` resolved to: a resume restores it
    main_process = is_rank_zero()  # only rank 0 writes the run dir's files and prints; every rank trains
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, unused_path(run_dir / "config.yaml"), resolve=True)  # a resume keeps the original
    if main_process and cfg.get("print_config", True):
        print_config_tree(cfg)

    datamodule = build_datamodule(cfg, plan)
    if cfg.get("plan_only"):  # the resolved plan alone: no model is built (3B parameters take 12 GB), nothing runs
        datamodule.setup()
        if main_process:
            tokens = datamodule.train_tokens()
            print_plan(plan_rows(cfg, plan, tokens))
        return {}
    if main_process:
        write_status(run_dir, "running")  # replaced by how it ends; a killed run keeps "running"
    module = build_module(cfg, plan)
    # Processes started together (torchrun, SLURM) meet before the data is built once, in prepare_data; a lone one
    # (Lightning's launcher starts the others later, inside fit) builds it here, for the plan's token count.
    if datamodule.prepared() or not launched_together():
        datamodule.setup()
    if main_process:
        print_plan(plan_rows(cfg, plan, datamodule.train_tokens() if datamodule.splits is not None else None))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks.append(ThroughputMeter(plan.peak_tflops))  # the run's tokens/s and MFU, always
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not any(isinstance(logger, TensorBoardLogger) for logger in loggers):  # the run's own record, always
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        plugins=trainer_plugins(cfg),
        precision=plan.precision,
        accumulate_grad_batches=plan.accumulate,
        # Lightning counts micro-batches; the config counts updates, so validation never lands inside a window.
        val_check_interval=plan.val_check_batches,
    )
    if main_process:
        plot_lr_curves(
            [(plan.schedule_label, plan.schedule, plan.peak_lr, plan.max_steps)],
            run_dir / "lr_schedule.png",
            title="planned learning rate",
        )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException as e:
        raise stopped(trainer, run_dir, getattr(e, "signum", signal.SIGTERM)) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["val/unigram_perplexity"] = datamodule.val_unigram_perplexity()
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    metrics["val/best_loss"] = float(best) if best is not None else metrics.get("val/loss", math.inf)
    metrics["steps"] = trainer.global_step
    metrics["wall_time_s"] = time.monotonic() - started
    if not trainer.is_global_zero:
        return metrics
    metrics["lr_audit"] = audit_run(plan, run_dir, trainer.global_step)
    write_status(run_dir, "completed", **metrics)
    print_summary(metrics, run_dir)
    return metrics
