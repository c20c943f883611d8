"""`train(cfg)`: compose the objects a config describes, fit, and report. No `@hydra.main` here."""

import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .callbacks import Preempted
from .checkpoint import CHECKPOINT_FORMAT, FORMAT_KEY, load_checkpoint
from .console import route_records, silence_lightning_noise
from .data import check_streaming_options
from .errors import ConfigError
from .lr_plan import audit_logged_lrs, planned_lrs, plot_lr_curves
from .model import build_model, count_parameters
from .module import MaskedLMModule
from .perf import resolve_peak_tflops
from .reporting import print_config_tree, print_plan, print_summary
from .sweep import validation_steps, write_status
from .tblog import read_scalars

log = logging.getLogger(__name__)

LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "name")  # passed to Lightning, not to the schedule


def split_scheduler_config(scheduler_cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schedule function's `_partial_` config, Lightning's lr_scheduler keys)."""
    schedule = OmegaConf.to_container(scheduler_cfg, resolve=True)
    lightning = {k: schedule.pop(k) for k in LIGHTNING_SCHEDULER_KEYS if k in schedule}
    return schedule, lightning


def split_optimizer_config(optimizer_cfg: DictConfig) -> tuple[dict[str, Any], bool]:
    """(the torch optimizer's `_partial_` config, whether biases/LayerNorm skip weight decay)."""
    optimizer = OmegaConf.to_container(optimizer_cfg, resolve=True)
    return optimizer, bool(optimizer.pop("no_decay_bias_and_norm", False))


def cpu_supports_bf16() -> bool:
    """True on x86 CPUs with native bf16 (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`auto`: bf16-mixed where the hardware runs it natively (recent GPUs, AVX512-BF16/AMX CPUs), else fp32."""
    if precision != "auto":
        return precision
    if uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def check_config(cfg: DictConfig) -> None:
    """Reject values that would fail late or train silently wrong, with the fix in the message."""
    if not cfg.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr={cfg.optimizer.lr} must be > 0 (it is the peak LR); e.g. optimizer.lr=4e-4")
    if not cfg.trainer.max_steps > 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be > 0; e.g. trainer.max_steps=1000")
    if cfg.scheduler.get("warmup_steps", 0) < 0:
        raise ConfigError(f"scheduler.warmup_steps={cfg.scheduler.warmup_steps} is negative; use 0 or more")
    if cfg.get("ckpt_path"):
        check_checkpoint_matches(cfg)
    init_from = cfg.model.get("init_from")
    if init_from and not (Path(init_from) / "config.json").is_file():
        raise ConfigError(f"model.init_from={init_from} holds no config.json; pass a local Hugging Face ESM directory")
    for key in ("train_path", "val_path"):
        path = cfg.data.get(key)
        streamed_dir = key == "train_path" and cfg.data.get("streaming") and Path(str(path)).is_dir()
        if path and not Path(path).is_file() and not streamed_dir:
            raise ConfigError(f"data.{key}={path} does not exist; pass the path of a FASTA file (.fasta or .fasta.gz)")
    strategy = cfg.trainer.get("strategy")
    if "fsdp" in str(strategy).lower() and cfg.trainer.accelerator == "cpu":  # (a SLURM login node has no GPU)
        raise ConfigError(
            "trainer=fsdp needs GPUs (Lightning's FSDP strategy refuses the CPU); on CPU use trainer=ddp "
            "trainer.accelerator=cpu"
        )
    if cfg.data.get("streaming"):
        data = cfg.data
        check_streaming_options(data.val_path, data.max_tokens, data.get("cluster_map"), data.get("tokens_per_update"))
    fp16 = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator) in ("16-mixed", 16, "16")
    if fp16 and cfg.optimizer.get("fused") and cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "a fused optimizer unscales fp16 gradients inside its step, so they cannot be clipped before it; "
            "set optimizer.fused=false (or trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null)"
        )
    build_schedule(cfg)
    if cfg.scheduler.get("warmup_steps", 0) > cfg.trainer.max_steps:
        log.warning(
            "scheduler.warmup_steps=%s exceeds trainer.max_steps=%s: the LR never reaches optimizer.lr",
            cfg.scheduler.warmup_steps,
            cfg.trainer.max_steps,
        )


def check_checkpoint_matches(cfg: DictConfig) -> None:
    """The checkpoint to continue from must load safely and hold the requested architecture."""
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass the path of a .ckpt file")
    checkpoint = load_checkpoint(cfg.ckpt_path, mmap=True)  # metadata only: the tensors stay on disk
    if checkpoint.get(FORMAT_KEY, 1) < CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} was written by an older protein-mlm (format {checkpoint.get(FORMAT_KEY, 1)}) "
            "whose data position cannot be restored exactly; start a new run, or continue from its weights with "
            "model.init_from=<a directory written by scripts/export_hf.py>"
        )
    saved = checkpoint["hyper_parameters"]["architecture"]
    wanted = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    differing = [
        f"{k}: {saved.get(k)} in the checkpoint, {wanted.get(k)} requested"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k) != wanted.get(k)
    ]
    if differing:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} holds another model ({'; '.join(differing)}); "
            "pick the model= preset it was trained with"
        )


def num_devices(trainer_cfg: DictConfig) -> int:
    """Processes per node: `devices` as a count, a list of device ids, or -1 / "auto" (every GPU, else 1)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices)
    return max(torch.cuda.device_count(), 1) if trainer_cfg.get("accelerator") != "cpu" else 1


def is_rank_zero() -> bool:
    """False in the other processes of a distributed run (Lightning's DDP children, SLURM tasks > 0)."""
    return rank_zero_only.rank == 0


def accumulation_steps(cfg: DictConfig) -> int:
    """Micro-batches per update: from data.tokens_per_update when set, else trainer.accumulate_grad_batches."""
    target = cfg.data.get("tokens_per_update")
    if not target:
        return cfg.trainer.accumulate_grad_batches
    if not cfg.data.get("max_tokens"):
        raise ConfigError("data.tokens_per_update needs a token budget per batch; set data.max_tokens too")
    per_micro_batch = cfg.data.max_tokens * num_devices(cfg.trainer) * cfg.trainer.get("num_nodes", 1)
    return max(1, math.ceil(target / per_micro_batch))


def validation_interval(cfg: DictConfig, accumulate: int) -> int | float:
    """`trainer.val_check_interval` (in updates) as the micro-batch count Lightning wants."""
    interval = cfg.trainer.val_check_interval
    return interval * accumulate if isinstance(interval, int) else interval


def build_schedule(cfg: DictConfig):
    """The configured `step -> multiplier` function, checked at the first and the last step."""
    schedule_cfg, _ = split_scheduler_config(cfg.scheduler)
    schedule = instantiate(schedule_cfg)
    try:
        for step in (0, cfg.trainer.max_steps - 1):
            value = schedule(step)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"the schedule gives LR multiplier {value} at step {step}; check scheduler.*")
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return schedule


def build_module(cfg: DictConfig) -> MaskedLMModule:
    optimizer_cfg, no_decay = split_optimizer_config(cfg.optimizer)
    _, lightning_keys = split_scheduler_config(cfg.scheduler)
    return MaskedLMModule(
        architecture=OmegaConf.to_container(cfg.model.architecture, resolve=True),
        optimizer=instantiate(optimizer_cfg),
        schedule=build_schedule(cfg),
        lr_scheduler=lightning_keys,
        no_decay_bias_and_norm=no_decay,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        inject_nan_at_step=cfg.faults.inject_nan_at_step,
        init_from=cfg.model.get("init_from"),
        activation_checkpointing=cfg.model.get("activation_checkpointing", False),
        compile=cfg.model.get("compile", False),
        peak_tflops=resolve_peak_tflops(
            cfg.get("perf", {}).get("peak_tflops"),
            resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
            uses_gpu(cfg.trainer.accelerator),
        ),
    )


def unused_path(path: Path) -> Path:
    """`path`, or `<stem>-resume-N<suffix>` when it exists already."""
    n = 0
    while path.exists():
        n += 1
        path = path.with_name(f"{path.stem.split('-resume-')[0]}-resume-{n}{path.suffix}")
    return path


def schedule_label(cfg: DictConfig) -> str:
    keys = ("warmup_steps", "final_lr_ratio", "decay_end_fraction", "timescale", "power")
    details = ", ".join(f"{k}={cfg.scheduler[k]}" for k in keys if cfg.scheduler.get(k) is not None)
    return f"{cfg.scheduler.name}: peak {cfg.optimizer.lr:g}, {details}, max_steps={cfg.trainer.max_steps}"


def audit_run(cfg: DictConfig, schedule, run_dir: Path, steps_done: int) -> str:
    """Compare the LR logged at every step with the planned curve; warn when they differ."""
    scalars = read_scalars(run_dir)
    tags = [t for t in scalars if t == cfg.scheduler.name or t.startswith(f"{cfg.scheduler.name}/")]
    if not tags:
        return "skipped (no LR logged to TensorBoard)"
    planned = planned_lrs(schedule, cfg.optimizer.lr, steps_done)
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


def short_list(values: list[int], shown: int = 6) -> str:
    """'1, 2, 3' or '1, 2, 3, ... (N in all)'."""
    head = ", ".join(f"{v:,}" for v in values[:shown])
    return head if len(values) <= shown else f"{head}, ... ({len(values)} in all)"


def plan_rows(cfg: DictConfig, schedule, accumulate: int, train_tokens: int | None) -> list[tuple[str, str]]:
    """What will run, resolved: batch size in tokens, accumulation, schedule milestones, epochs implied."""
    devices = num_devices(cfg.trainer)
    per_update = (cfg.data.max_tokens or cfg.data.batch_size * cfg.data.max_length) * devices * accumulate
    per_update *= cfg.trainer.get("num_nodes", 1)
    steps = cfg.trainer.max_steps
    parameters = count_parameters(build_model(OmegaConf.to_container(cfg.model.architecture), device="meta"))
    return [
        ("model parameters", f"{parameters / 1e6:,.2f} M ({cfg.model.name})"),
        (
            "validations (after step)",
            short_list(validation_steps(cfg.trainer.max_steps, cfg.trainer.val_check_interval)),
        ),
        ("padded tokens per update (at most)", f"{per_update:,}"),
        ("target tokens per update", f"{cfg.data.tokens_per_update:,}" if cfg.data.get("tokens_per_update") else "-"),
        ("accumulate_grad_batches", str(accumulate)),
        ("warmup steps / total steps", f"{cfg.scheduler.get('warmup_steps', 0):,} / {steps:,}"),
        ("peak LR / LR at the last step", f"{cfg.optimizer.lr:.3g} / {cfg.optimizer.lr * schedule(steps - 1):.3g}"),
        ("epochs max_steps implies (about)", f"{steps * per_update / train_tokens:.2f}" if train_tokens else "-"),
    ]


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as the config says; return the final validation metrics."""
    silence_lightning_noise()
    route_records()
    check_config(cfg)
    started = time.monotonic()
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    main_process = is_rank_zero()  # only rank 0 writes the run dir's files and prints; every rank trains
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, unused_path(run_dir / "config.yaml"), resolve=True)  # a resume keeps the original
    if main_process and cfg.get("print_config", True):
        print_config_tree(cfg)

    datamodule = instantiate(cfg.data)
    if cfg.get("plan_only"):  # the resolved plan alone: no model is built (3B parameters take 12 GB), nothing runs
        datamodule.setup()
        if main_process:
            tokens = datamodule.train_tokens()
            print_plan(plan_rows(cfg, build_schedule(cfg), accumulation_steps(cfg), tokens))
        return {}
    if main_process:
        write_status(run_dir, "running")  # replaced by how it ends; a killed run keeps "running"
    module = build_module(cfg)
    accumulate = accumulation_steps(cfg)
    datamodule.setup()
    if main_process:
        print_plan(plan_rows(cfg, module.schedule, accumulate, datamodule.train_tokens()))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not any(isinstance(logger, TensorBoardLogger) for logger in loggers):  # the run's own record, always
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False))
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        precision=precision,
        accumulate_grad_batches=accumulate,
        # Lightning counts micro-batches; the config counts updates, so validation never lands inside a window.
        val_check_interval=validation_interval(cfg, accumulate),
    )
    if main_process:
        plot_lr_curves(
            [(schedule_label(cfg), module.schedule, cfg.optimizer.lr, cfg.trainer.max_steps)],
            run_dir / "lr_schedule.png",
            title="planned learning rate",
        )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        error = Preempted(
            f"stopped by SIGTERM after step {trainer.global_step}; saved checkpoints/last.ckpt; "
            f"continue with resume={run_dir}"
        )
        error.step = trainer.global_step
        raise error from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["val/unigram_perplexity"] = datamodule.val_unigram_perplexity()
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    metrics["val/best_loss"] = float(best) if best is not None else metrics.get("val/loss", math.inf)
    metrics["steps"] = trainer.global_step
    metrics["wall_time_s"] = time.monotonic() - started
    if not trainer.is_global_zero:
        return metrics
    metrics["lr_audit"] = audit_run(cfg, module.schedule, run_dir, trainer.global_step)
    write_status(run_dir, "completed", **metrics)
    print_summary(metrics, run_dir)
    return metrics
