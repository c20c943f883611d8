"""A config resolved once, before anything is built: precision, devices, accumulation, the validation interval,
the schedule function and the plan table. Everything after the checks reads the `RunPlan` instead of `cfg`."""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from protein_mlm.errors import ConfigError
from protein_mlm.launch import local_device
from protein_mlm.model.attention import varlen_available
from protein_mlm.model.esm import build_model, can_compile, count_parameters
from protein_mlm.model.perf import cpu_flags, resolve_peak_tflops

AUTO_WORKERS = 4  # data.num_workers=auto on a GPU: loader processes per training process (scripts/loader_speed.py)
COMPILE_MIN_STEPS = 100  # model.compile=auto: shorter runs rarely earn back a one-off compile of the layers


@dataclass(frozen=True)
class RunPlan:
    """What a config resolves to; made by `resolve`, read by `train`."""

    precision: str | int  # Lightning's precision, `auto` resolved for this machine
    on_gpu: bool  # the accelerator is a GPU
    devices: int  # processes per node
    accumulate: int  # micro-batches per optimizer update
    val_check_batches: int | float  # trainer.val_check_interval in micro-batches, as Lightning counts
    schedule: Callable[[int], float]  # step -> LR multiplier
    peak_tflops: float | None  # the accelerator's peak at this precision, for MFU (None on CPUs unless configured)
    compile: bool  # model.compile, where this machine can compile
    packing: bool  # data.packing, `auto` resolved (saved in the run's config.yaml, so a resume keeps its batches)
    num_workers: int  # data.num_workers, `auto` resolved for this machine
    parameters: int  # trainable parameters of model.architecture (counted once, on the meta device)
    max_steps: int  # trainer.max_steps: optimizer updates
    peak_lr: float  # optimizer.lr
    optimizer: dict[str, Any]  # the torch optimizer's `_partial_` config
    no_decay_bias_and_norm: bool  # biases and LayerNorm weights skip weight decay
    lr_scheduler: dict[str, Any]  # Lightning's lr_scheduler keys (interval, frequency, name)
    schedule_label: str  # the schedule in one line, for plots


def resolve_compile(setting: bool | str, max_steps: int, on_gpu: bool) -> bool:
    """model.compile: true / false, or auto = on for runs of COMPILE_MIN_STEPS updates or more, where it can be."""
    if setting == "auto":
        return max_steps >= COMPILE_MIN_STEPS and can_compile(on_gpu, quiet=True)
    return bool(setting) and can_compile(on_gpu)


def resolve_packing(setting: bool | str, on_gpu: bool, data: DictConfig, attention_dropout: float) -> bool:
    """data.packing: true / false, or auto = on where varlen flash attention runs (a CUDA GPU, torch >= 2.9) and the
    data allows it (a token budget, not streamed) - there packed rows measured faster than padded batches."""
    if setting != "auto":
        return bool(setting)
    fits = data.get("max_tokens") is not None and not data.get("streaming") and attention_dropout == 0
    return on_gpu and fits and varlen_available()


def resolve_num_workers(setting: int | str, on_gpu: bool, devices: int) -> int:
    """data.num_workers: a count, or auto = 0 on CPUs (the cores train), else up to AUTO_WORKERS per GPU process."""
    if setting != "auto":
        return int(setting)
    if not on_gpu:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(AUTO_WORKERS, cores // max(devices, 1) - 1))


def resolve(cfg: DictConfig) -> RunPlan:
    """Derive everything the run needs from the config, once (raises ConfigError for what cannot resolve)."""
    accumulate = accumulation_steps(cfg)
    precision, on_gpu = (
        resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        uses_gpu(cfg.trainer.accelerator),
    )
    schedule_cfg, lightning_keys = split_scheduler_config(cfg.scheduler)
    optimizer, no_decay = split_optimizer_config(cfg.optimizer)
    architecture = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    return RunPlan(
        precision=precision,
        on_gpu=on_gpu,
        devices=num_devices(cfg.trainer),
        accumulate=accumulate,
        val_check_batches=validation_interval(cfg, accumulate),
        schedule=make_schedule(schedule_cfg, cfg.trainer.max_steps),
        peak_tflops=resolve_peak_tflops(cfg.get("perf", {}).get("peak_tflops"), precision, on_gpu, local_device()),
        compile=resolve_compile(cfg.model.get("compile", False), cfg.trainer.max_steps, on_gpu),
        packing=resolve_packing(
            cfg.data.get("packing", False),
            on_gpu,
            cfg.data,
            cfg.model.architecture.get("attention_probs_dropout_prob", 0.0),
        ),
        num_workers=resolve_num_workers(cfg.data.get("num_workers", 0), on_gpu, num_devices(cfg.trainer)),
        parameters=count_parameters(build_model(architecture, device="meta")),
        max_steps=cfg.trainer.max_steps,
        peak_lr=cfg.optimizer.lr,
        optimizer=optimizer,
        no_decay_bias_and_norm=no_decay,
        lr_scheduler=lightning_keys,
        schedule_label=schedule_label(cfg),
    )


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
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def gpu_supports_bf16() -> bool:
    """Native bf16 (compute capability 8.0+) on this rank's own GPU, asked without creating a CUDA context.

    This runs in every DDP rank before Lightning sets the device: `is_bf16_supported` would ask the current
    device (GPU 0 on every rank) and may run a kernel there, a context and half a GB of GPU 0 per rank.
    """
    return torch.cuda.is_available() and torch.cuda.get_device_capability(local_device())[0] >= 8


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`auto`: bf16-mixed where the hardware runs it natively (recent GPUs, AVX512-BF16/AMX CPUs), else fp32."""
    if precision != "auto":
        return precision
    if uses_gpu(accelerator):
        return "bf16-mixed" if gpu_supports_bf16() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


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


def build_schedule(cfg: DictConfig) -> Callable[[int], float]:
    """The configured `step -> multiplier` function, checked at the first and the last step."""
    return make_schedule(split_scheduler_config(cfg.scheduler)[0], cfg.trainer.max_steps)


def make_schedule(schedule_cfg: dict[str, Any], max_steps: int) -> Callable[[int], float]:
    """The schedule a `_partial_` config describes, checked at the first and the last step."""
    schedule = instantiate(schedule_cfg)
    try:
        for step in (0, max_steps - 1):
            value = schedule(step)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"the schedule gives LR multiplier {value} at step {step}; check scheduler.*")
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return schedule


def schedule_label(cfg: DictConfig) -> str:
    """`inverse_sqrt: peak 0.0004, warmup_steps=2000, ..., max_steps=...`: a curve's name in LR plots."""
    keys = ("warmup_steps", "final_lr_ratio", "decay_end_fraction", "timescale", "power")
    details = ", ".join(f"{k}={cfg.scheduler[k]}" for k in keys if cfg.scheduler.get(k) is not None)
    return f"{cfg.scheduler.name}: peak {cfg.optimizer.lr:g}, {details}, max_steps={cfg.trainer.max_steps}"


def validation_steps(max_steps: int, interval: Any) -> list[int]:
    """The optimizer steps after which a run validates: every `interval` updates, and after the last."""
    every = list(range(interval, max_steps + 1, interval)) if isinstance(interval, int) and interval > 0 else []
    return every if every and every[-1] == max_steps else [*every, max_steps]


def short_list(values: list[int], shown: int = 6) -> str:
    """'1, 2, 3' or '1, 2, 3, ... (N in all)'."""
    head = ", ".join(f"{v:,}" for v in values[:shown])
    return head if len(values) <= shown else f"{head}, ... ({len(values)} in all)"


def plan_rows(cfg: DictConfig, plan: RunPlan, train_tokens: int | None) -> list[tuple[str, str]]:
    """What will run, resolved: batch size in tokens, accumulation, schedule milestones, epochs implied."""
    per_update = (cfg.data.max_tokens or cfg.data.batch_size * cfg.data.max_length) * plan.devices * plan.accumulate
    per_update *= cfg.trainer.get("num_nodes", 1)
    steps = plan.max_steps
    last_lr = plan.peak_lr * plan.schedule(steps - 1)
    rows = [
        ("model parameters", f"{plan.parameters / 1e6:,.2f} M ({cfg.model.name})"),
        ("validations (after step)", short_list(validation_steps(steps, cfg.trainer.val_check_interval))),
        ("padded tokens per update (at most)", f"{per_update:,}"),
        ("target tokens per update", f"{cfg.data.tokens_per_update:,}" if cfg.data.get("tokens_per_update") else "-"),
        ("accumulate_grad_batches", str(plan.accumulate)),
        ("warmup steps / total steps", f"{cfg.scheduler.get('warmup_steps', 0):,} / {steps:,}"),
        ("peak LR / LR at the last step", f"{plan.peak_lr:.3g} / {last_lr:.3g}"),
        ("epochs max_steps implies (about)", f"{steps * per_update / train_tokens:.2f}" if train_tokens else "-"),
    ]
    zero_shot = (cfg.get("callbacks") or {}).get("zero_shot")
    if zero_shot:
        rows.append(("zero-shot scoring per validation", zero_shot_cost(zero_shot, plan.devices)))
    return rows


def zero_shot_cost(zero_shot: DictConfig, devices: int) -> str:
    """What callbacks.zero_shot adds to every validation: sequences read, split over the ranks."""
    from protein_mlm.inference.proteingym import read_reference
    from protein_mlm.inference.tracking import assay_scan, load_scan, passes_per_validation

    scans = [load_scan(dict(spec)) for spec in zero_shot.get("scans") or []]
    if zero_shot.get("reference"):  # a ProteinGym panel
        ids = list(zero_shot.get("dms_ids") or []) or None
        assays = read_reference(Path(zero_shot.reference), Path(zero_shot.dms_folder), ids)
        scans += [assay_scan(assay) for assay in assays]
    strategy = zero_shot.get("strategy", "masked-marginals")
    passes = passes_per_validation(scans, strategy)
    mutants = sum(len(scan.mutants) for scan in scans)
    per_rank = f", about {passes_per_validation(scans, strategy, devices):,} per rank" if devices > 1 else ""
    return f"{len(scans)} scans, {mutants:,} mutants, {passes:,} sequence passes ({strategy}){per_rank}"
