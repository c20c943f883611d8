"""A config resolved once, before anything is built: precision, devices, accumulation, the validation interval,
the schedule function and the plan table. Everything after the checks reads the `RunPlan` instead of `cfg`."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from protein_mlm.errors import ConfigError
from protein_mlm.launch import cores_per_process, local_device
from protein_mlm.model.attention import varlen_available
from protein_mlm.model.esm import build_model, can_compile, count_parameters
from protein_mlm.model.perf import cpu_flags, resolve_peak_tflops

AUTO_WORKERS = 4  # data.num_workers=auto on a GPU: loader processes per training process (scripts/loader_speed.py)
COMPILE_MIN_STEPS = 100  # model.compile=auto: shorter runs rarely earn back a one-off compile of the layers
BF16_CAPABILITY = (8, 0)  # native bf16 and varlen flash attention (Ampere and later); T4 (7.5) and V100 (7.0) lack both


@dataclass(frozen=True)
class Gpu:
    """The GPU this process trains on, as its properties describe it (read without a CUDA context)."""

    index: int  # the CUDA device index (trainer.devices[local rank] for a list of ids)
    name: str  # e.g. "Tesla T4"
    capability: tuple[int, int]  # compute capability, e.g. (7, 5)

    def __str__(self) -> str:
        return f"{self.name} (GPU {self.index}, compute capability {self.capability[0]}.{self.capability[1]})"


@dataclass(frozen=True)
class RunPlan:
    """What a config resolves to; made by `resolve`, read by `train`."""

    precision: str | int  # Lightning's precision, `auto` resolved for this machine
    on_gpu: bool  # the accelerator is a GPU
    gpu: Gpu | None  # the GPU the `auto`s were decided for; None on CPUs or where no GPU is visible (a login node)
    attention: str  # model.architecture.attn_implementation
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
    loss_divisor: float = 1.0  # the summed token loss is back-propagated divided by this (fp16: keeps it in range)


# The config keys whose `auto` the plan resolves, and the RunPlan field holding what it resolved to: config.yaml
# records these values (record_resolved), so a resume on another machine runs what the run started with.
RESOLVED_KEYS = {
    "trainer.precision": "precision",
    "model.compile": "compile",
    "data.packing": "packing",
    "data.num_workers": "num_workers",
}


def record_resolved(cfg: DictConfig, plan: RunPlan) -> None:
    """Write the plan's value of every RESOLVED_KEYS key into `cfg` (no `auto` left), before config.yaml is saved."""
    with open_dict(cfg):
        for key, field in RESOLVED_KEYS.items():
            OmegaConf.update(cfg, key, getattr(plan, field), merge=False)


def resolve_compile(setting: bool | str, max_steps: int, on_gpu: bool) -> bool:
    """model.compile: true / false, or auto = on for runs of COMPILE_MIN_STEPS updates or more, where it can be."""
    if setting == "auto":
        return max_steps >= COMPILE_MIN_STEPS and can_compile(on_gpu, quiet=True)
    return bool(setting) and can_compile(on_gpu)


def resolve_packing(
    setting: bool | str,
    on_gpu: bool,
    data: DictConfig,
    attention_dropout: float,
    attention: str = "sdpa",
    gpu: Gpu | None = None,
    precision: str | int = "bf16-mixed",
) -> bool:
    """data.packing: true / false, or auto = on where varlen flash attention runs (our sdpa in 16-bit on a CUDA GPU
    of compute capability 8.0+, torch >= 2.9) and the data allows it (a token budget, not streamed) - there packed
    rows measured faster than padded batches."""
    if setting != "auto":
        return bool(setting)
    fits = data.get("max_tokens") is not None and not data.get("streaming") and attention_dropout == 0
    capable = gpu is None or gpu.capability >= BF16_CAPABILITY
    flash = attention == "sdpa" and capable and "16" in str(precision) and varlen_available()
    return on_gpu and fits and flash


def resolve_num_workers(setting: int | str, on_gpu: bool, devices: int) -> int:
    """data.num_workers: a count, or auto = 0 on CPUs (the cores train), else up to AUTO_WORKERS per GPU process,
    leaving one of this process's cores to it."""
    if setting != "auto":
        return int(setting)
    if not on_gpu:
        return 0
    return max(0, min(AUTO_WORKERS, cores_per_process(devices) - 1))


def resolve_fused(setting: bool | str | None, precision: str | int, clip: float | None) -> bool | None:
    """optimizer.fused: true / false, or auto = fused except under fp16 with clipping (its loss scaler unscales inside
    a fused step, after the point where clipping must happen)."""
    if setting != "auto":
        return setting
    return not (is_fp16(precision) and clip)


def is_fp16(precision: str | int) -> bool:
    return str(precision) in ("16-mixed", "16", "16-true")


def loss_divisor(cfg: DictConfig, precision: str | int) -> float:
    """fp16: the tokens of a micro-batch (its budget), so the back-propagated loss is a per-token mean.

    A summed loss over >= 16k targets times GradScaler's initial scale (65,536) overflows fp16 gradients, so the
    first updates were skipped while the scale backed off. Bias gradients sum over every token of the micro-batch, not
    only the targets: dividing by the targets alone still overflowed one (46k of fp16's 65k at ~19k targets), by all
    tokens left 3x headroom. The module multiplies the factor back in its per-update rescale, so the update is the
    same token mean; one number for every rank and micro-batch, so it folds exactly.
    """
    if not is_fp16(precision):
        return 1.0
    return float(cfg.data.get("max_tokens") or cfg.data.batch_size * cfg.data.max_length)


def resolve(cfg: DictConfig) -> RunPlan:
    """Derive everything the run needs from the config, once (raises ConfigError for what cannot resolve)."""
    accumulate = accumulation_steps(cfg)
    on_gpu = uses_gpu(cfg.trainer.accelerator)
    gpu = this_gpu(cfg.trainer) if on_gpu else None
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator, gpu)
    schedule_cfg, lightning_keys = split_scheduler_config(cfg.scheduler)
    optimizer, no_decay = split_optimizer_config(cfg.optimizer, precision, cfg.trainer.get("gradient_clip_val"))
    architecture = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    attention = architecture.get("attn_implementation", "sdpa")
    return RunPlan(
        precision=precision,
        on_gpu=on_gpu,
        gpu=gpu,
        attention=attention,
        devices=num_devices(cfg.trainer),
        accumulate=accumulate,
        val_check_batches=validation_interval(cfg, accumulate),
        schedule=make_schedule(schedule_cfg, cfg.trainer.max_steps),
        peak_tflops=resolve_peak_tflops(cfg.get("perf", {}).get("peak_tflops"), precision, gpu and gpu.name),
        compile=resolve_compile(cfg.model.get("compile", False), cfg.trainer.max_steps, on_gpu),
        packing=resolve_packing(
            cfg.data.get("packing", False),
            on_gpu,
            cfg.data,
            cfg.model.architecture.get("attention_probs_dropout_prob", 0.0),
            attention,
            gpu,
            precision,
        ),
        num_workers=resolve_num_workers(cfg.data.get("num_workers", 0), on_gpu, num_devices(cfg.trainer)),
        parameters=count_parameters(build_model(architecture, device="meta")),
        max_steps=cfg.trainer.max_steps,
        peak_lr=cfg.optimizer.lr,
        optimizer=optimizer,
        no_decay_bias_and_norm=no_decay,
        lr_scheduler=lightning_keys,
        schedule_label=schedule_label(cfg),
        loss_divisor=loss_divisor(cfg, precision),
    )


LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "name")  # passed to Lightning, not to the schedule


def split_scheduler_config(scheduler_cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schedule function's `_partial_` config, Lightning's lr_scheduler keys)."""
    schedule = OmegaConf.to_container(scheduler_cfg, resolve=True)
    lightning = {k: schedule.pop(k) for k in LIGHTNING_SCHEDULER_KEYS if k in schedule}
    return schedule, lightning


def split_optimizer_config(
    optimizer_cfg: DictConfig, precision: str | int = "32-true", clip: float | None = None
) -> tuple[dict[str, Any], bool]:
    """(the torch optimizer's `_partial_` config with `fused: auto` resolved, whether biases/LayerNorm skip decay)."""
    optimizer = OmegaConf.to_container(optimizer_cfg, resolve=True)
    if "fused" in optimizer:
        optimizer["fused"] = resolve_fused(optimizer["fused"], precision, clip)
    return optimizer, bool(optimizer.pop("no_decay_bias_and_norm", False))


def cpu_supports_bf16() -> bool:
    """True on x86 CPUs with native bf16 (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def this_gpu(trainer_cfg: DictConfig) -> Gpu | None:
    """This rank's own GPU (trainer.devices[local rank] for a list of ids), or None where no GPU is visible.

    Asked without creating a CUDA context: this runs in every DDP rank before Lightning sets the device, and
    `is_bf16_supported` or `mem_get_info` would ask the current device (GPU 0 on every rank), a context and half a
    GB of a GPU the rank may not even use.
    """
    if not torch.cuda.is_available():
        return None
    devices, count = trainer_cfg.get("devices"), torch.cuda.device_count()
    index = local_device(devices)
    missing = max(list(devices) if OmegaConf.is_list(devices) else [index])
    if missing >= count:
        raise ConfigError(
            f"trainer.devices={devices} names GPU {missing}, but this machine has {count} GPUs "
            f"(0 to {count - 1}); use device ids below {count}"
        )
    capability = tuple(torch.cuda.get_device_capability(index))
    return Gpu(index, torch.cuda.get_device_properties(index).name, capability)


def gpu_supports_bf16(gpu: Gpu | None) -> bool:
    """Native bf16 (compute capability 8.0+); a GPU not visible here (a login node planning a job) is assumed to."""
    return gpu is None or gpu.capability >= BF16_CAPABILITY


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str | int, accelerator: str, gpu: Gpu | None = None) -> str | int:
    """`auto`: bf16-mixed where the hardware runs it natively (GPUs of compute capability 8.0+, AVX512-BF16/AMX
    CPUs), fp16 with loss scaling on older GPUs (T4, V100), else fp32."""
    if precision != "auto":
        return precision
    if uses_gpu(accelerator):
        return "bf16-mixed" if gpu_supports_bf16(gpu) else "16-mixed"
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
        *resolved_rows(plan),
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


def attention_path(plan: RunPlan) -> str:
    """Which attention kernel the batches take: padded SDPA, varlen flash, or a block-diagonal mask."""
    if not plan.packing:
        return f"{plan.attention} (padded batches)"
    if plan.attention != "sdpa":
        return f"{plan.attention}, packed rows through a block-diagonal mask"
    if plan.on_gpu and "16" in str(plan.precision) and varlen_available():
        return "sdpa, packed rows through varlen flash attention"
    return "sdpa, packed rows through a block-diagonal mask (the reference path)"


def resolved_rows(plan: RunPlan) -> list[tuple[str, str]]:
    """What every `auto` resolved to, and the hardware it was decided for."""
    if plan.gpu is not None:
        hardware = str(plan.gpu)
    elif plan.on_gpu:
        hardware = "a GPU not visible here: decided again on the machine that trains"
    else:
        hardware = "CPU"
    fused = plan.optimizer.get("fused")
    return [
        ("decided for", hardware),
        ("precision", str(plan.precision)),
        ("packing", "on" if plan.packing else "off"),
        ("attention", attention_path(plan)),
        ("compile", "on" if plan.compile else "off"),
        ("loader workers per process", str(plan.num_workers)),
        *([("fused optimizer step", "on" if fused else "off")] if fused is not None else []),
        ("MFU peak", f"{plan.peak_tflops:g} TFLOP/s" if plan.peak_tflops else "none (no MFU reported)"),
    ]


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
