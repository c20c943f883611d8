"""Check a run's config before anything is built or written: the rules a valid run must follow, each with the fix
in its one-line error, and the resolved `RunPlan` (plan.py) that the run then reads."""

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from protein_mlm.data.fasta import has_residue_line
from protein_mlm.data.options import check_data_options
from protein_mlm.errors import ConfigError, DataError
from protein_mlm.launch import distributed_rank
from protein_mlm.model import memory
from protein_mlm.model.attention import IMPLEMENTATIONS, PACKED
from protein_mlm.model.checkpoints import CHECKPOINT_FORMAT, FORMAT_KEY, check_init_from, load_checkpoint
from protein_mlm.plan import BF16_CAPABILITY, RunPlan, is_fp16, num_devices, resolve, uses_gpu
from protein_mlm.rules import ValueRule, check_value

log = logging.getLogger(__name__)

BETAS = "optimizer.betas=[0.9,0.98]"


def _unit(value: Any) -> bool:
    """A number (not a bool) in [0, 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


# The value rules of a run, in one table (the data.* ones are data/options.py's): key, type (None: may be null; list:
# a list whose shape the requirement checks), the requirement, an example. A key the config does not have (e.g. SGD's
# momentum under AdamW) is skipped.
VALUE_RULES = (
    ValueRule("optimizer.lr", (float,), lambda v: v > 0, "> 0 (the peak LR)", "optimizer.lr=4e-4"),
    ValueRule("trainer.max_steps", (int,), lambda v: v > 0, "> 0 (optimizer updates)", "trainer.max_steps=1000"),
    ValueRule("scheduler.warmup_steps", (int,), lambda v: v >= 0, ">= 0", "scheduler.warmup_steps=100"),
    ValueRule("trainer.accumulate_grad_batches", (int,), lambda v: v >= 1, ">= 1", "trainer.accumulate_grad_batches=4"),
    ValueRule(
        "trainer.val_check_interval", (int, None), lambda v: v >= 1, ">= 1 (updates)", "trainer.val_check_interval=500"
    ),
    ValueRule(
        "trainer.gradient_clip_val", (float, None), lambda v: v > 0, "> 0 or null", "trainer.gradient_clip_val=1.0"
    ),
    ValueRule("seed", (int,), lambda v: v >= 0, ">= 0", "seed=0"),
    ValueRule(
        "optimizer.betas", (list,), lambda v: len(v) == 2 and all(_unit(b) for b in v), "two numbers in [0, 1)", BETAS
    ),
    ValueRule("optimizer.eps", (float,), lambda v: v > 0, "> 0", "optimizer.eps=1e-8"),
    ValueRule("optimizer.weight_decay", (float,), lambda v: v >= 0, ">= 0", "optimizer.weight_decay=0.01"),
    ValueRule("optimizer.momentum", (float,), lambda v: 0 <= v < 1, "in [0, 1)", "optimizer.momentum=0.9"),
    ValueRule("scheduler.warmup_init_lr", (float,), lambda v: v >= 0, ">= 0", "scheduler.warmup_init_lr=0.0"),
    ValueRule("scheduler.final_lr_ratio", (float,), lambda v: 0 <= v <= 1, "in [0, 1]", "scheduler.final_lr_ratio=0.1"),
    ValueRule(
        "scheduler.decay_end_fraction", (float,), lambda v: 0 < v <= 1, "in (0, 1]", "scheduler.decay_end_fraction=0.9"
    ),
    ValueRule("scheduler.power", (float,), lambda v: v > 0, "> 0", "scheduler.power=1.0"),
    ValueRule("scheduler.timescale", (int, None), lambda v: v >= 1, ">= 1 or null", "scheduler.timescale=10000"),
    ValueRule("trainer.num_nodes", (int,), lambda v: v >= 1, ">= 1 (machines)", "trainer.num_nodes=2"),
    ValueRule("trainer.log_every_n_steps", (int,), lambda v: v >= 1, ">= 1 (updates)", "trainer.log_every_n_steps=10"),
    ValueRule(
        "trainer.num_sanity_val_steps", (int,), lambda v: v >= -1, ">= -1 (-1: all)", "trainer.num_sanity_val_steps=2"
    ),
)
ABSENT = object()


def check_values(cfg: DictConfig) -> None:
    """Each VALUE_RULES key has its type and range; the message names the key, the value and an example."""
    for rule in VALUE_RULES:
        value = OmegaConf.select(cfg, rule.key, default=ABSENT)
        if value is not ABSENT:
            check_value(rule, value)
    check_data_options(cfg.data)
    check_attention(cfg)
    if cfg.model.get("compile", False) not in (True, False, "auto"):
        raise ConfigError(f"model.compile={cfg.model.compile!r} must be true, false or auto; e.g. model.compile=auto")
    data = cfg.data
    arch = cfg.model.architecture
    if arch.get("position_embedding_type") == "absolute" and data.max_length > arch.max_position_embeddings - 2:
        raise ConfigError(
            f"data.max_length={data.max_length} exceeds what model={cfg.model.name}'s learned positions cover "
            f"({arch.max_position_embeddings - 2} tokens); use data.max_length={arch.max_position_embeddings - 2}"
        )


ATTENTION = "model.architecture.attn_implementation"
USE_SDPA = "use attn_implementation=sdpa"


def check_attention(cfg: DictConfig) -> None:
    """The attention implementation is one this project trains with, installed, and (packed) keeps sequences apart."""
    name = cfg.model.architecture.get("attn_implementation", "sdpa")
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"{ATTENTION}={name!r} is not one this project trains with; use {', '.join(IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"{ATTENTION}=flash_attention_2 needs the flash-attn package, which is not installed; "
            f"{USE_SDPA} (PyTorch's own flash kernels)"
        )
    if cfg.data.get("packing") is True and name not in PACKED:
        raise ConfigError(
            f"data.packing=true with {ATTENTION}={name} would let packed sequences attend to each other; "
            f"{USE_SDPA} or data.packing=false"
        )


def check_hardware(cfg: DictConfig, plan: RunPlan) -> None:
    """What the resolved plan asks of this machine's GPU (or CPU) it can run: precision, packing, attention.

    Decided for the GPU this rank will use; a machine that sees no GPU (a login node planning a job) is not judged.
    """
    name, gpu = plan.attention, plan.gpu
    if not plan.on_gpu and name in ("flex_attention", "flash_attention_2"):
        why = "PyTorch's FlexAttention has no CPU backward" if name == "flex_attention" else "flash-attn is CUDA-only"
        raise ConfigError(f"{ATTENTION}={name} cannot train on a CPU ({why}); {USE_SDPA} or eager")
    old_gpu = gpu is not None and gpu.capability < BF16_CAPABILITY  # FSDP there: check_fsdp refuses its fp16
    if not old_gpu:
        return
    where = f"{gpu} has none"
    if str(plan.precision).startswith("bf16"):
        raise ConfigError(
            f"trainer.precision={plan.precision} needs native bf16 (compute capability 8.0+) and {where}; "
            "use trainer.precision=auto (16-mixed with loss scaling here)"
        )
    if plan.packing and name == "sdpa":  # eager's packed rows take a block-diagonal mask instead
        raise ConfigError(
            f"data.packing=true with attn_implementation=sdpa needs varlen flash attention (compute capability 8.0+) "
            f"and {where}; use data.packing=false (what auto picks here)"
        )
    if name == "flash_attention_2":
        raise ConfigError(f"{ATTENTION}=flash_attention_2 needs compute capability 8.0+ and {where}; {USE_SDPA}")


def check_devices(trainer: DictConfig) -> None:
    """trainer.devices: a count, a list of device ids, or auto / -1; no more processes than this machine can serve.

    Counted without creating a CUDA context (`device_count` does not): on a machine without GPUs (a SLURM login
    node submitting a job) the GPU count is left to the job's own check.
    """
    devices = trainer.get("devices", 1)
    example = "e.g. trainer.devices=2, trainer.devices=[0,1] or trainer.devices=auto"
    is_ids = OmegaConf.is_list(devices) and all(isinstance(d, int) and not isinstance(d, bool) for d in devices)
    is_count = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    if not (is_ids or is_count or devices == "auto" or (isinstance(devices, str) and devices.isdigit())):
        raise ConfigError(f"trainer.devices={devices!r} is not a device count, a list of ids or auto; {example}")
    wanted = num_devices(trainer)
    if uses_gpu(trainer.get("accelerator", "auto")):
        have, what = (torch.cuda.device_count(), "GPUs") if torch.cuda.is_available() else (wanted, "")
    else:
        have, what = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, "cores"
    if wanted > have:
        raise ConfigError(
            f"trainer.devices={devices} asks for {wanted} processes on this machine, which has {have} {what}; "
            f"use trainer.devices={have} (and trainer.num_nodes for more machines)"
        )


def check_memory(cfg: DictConfig, plan: RunPlan | None = None) -> None:
    """Refuse a run whose estimated training memory exceeds what this machine (or GPU) has available."""
    if not cfg.get("perf", {}).get("check_memory", True):
        return
    plan = plan or resolve(cfg)
    arch, data, on_gpu = cfg.model.architecture, cfg.data, plan.on_gpu
    if on_gpu and distributed_rank() > 0:
        return  # rank 0 checked its GPU (reading it makes a context; here the rank has not chosen its GPU yet)
    if on_gpu and plan.gpu is None:
        return  # no GPU visible here: the job's own check
    available = memory.available_bytes(True, plan.gpu.index) if on_gpu else memory.available_bytes(False)
    if available is None:
        return
    processes = 1 if on_gpu else plan.devices  # DDP on CPU: every process on this host
    fsdp = "fsdp" in str(cfg.trainer.get("strategy")).lower()
    shards = plan.devices * cfg.trainer.get("num_nodes", 1) if fsdp else 1
    tokens = data.max_tokens or data.batch_size * data.max_length
    state, activations = memory.training_bytes(
        plan.parameters,
        arch.num_hidden_layers,
        arch.hidden_size,
        tokens,
        shards=shards,
        activation_checkpointing=cfg.model.get("activation_checkpointing", False),
    )
    need = (state + activations) * processes
    if need > available:
        gib = 2**30
        where = "this GPU" if on_gpu else "this machine"
        raise ConfigError(
            f"model={cfg.model.name} with {tokens:,} tokens per batch needs at least {need / gib:.1f} GiB "
            f"({state * processes / gib:.1f} GiB weights, gradients and AdamW states + "
            f"{activations * processes / gib:.1f} GiB activations) but {where} has {available / gib:.1f} GiB free; "
            "use model.activation_checkpointing=true, trainer=fsdp, a smaller model or data.max_tokens, or skip this "
            "estimate with perf.check_memory=false"
        )


def check_config(cfg: DictConfig) -> RunPlan:
    """Reject values that would fail late or train silently wrong, with the fix in the message; return the plan.

    Run once per run: the CLI checks before Hydra starts the job and hands the plan to `train`."""
    check_values(cfg)
    if cfg.get("ckpt_path"):
        check_checkpoint_matches(cfg)
    if cfg.model.get("init_from"):
        check_init_from(cfg.model.init_from)
    train, val = cfg.data.get("train_path"), cfg.data.get("val_path")
    if train and val and Path(train).resolve() == Path(val).resolve():
        raise ConfigError(
            f"data.train_path and data.val_path are the same file ({train}); pass a separate validation FASTA, or drop "
            "data.val_path to hold out data.val_fraction of the training file"
        )
    plan = resolve(cfg)
    if str(plan.precision).startswith("16") and not plan.on_gpu:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} needs a GPU (on CPU Lightning would train in bf16 instead); "
            "use trainer.precision=bf16-mixed or 32-true"
        )
    plan = check_fsdp(cfg, plan)  # before the hardware: FSDP's own precision rule names FSDP
    check_hardware(cfg, plan)
    for key in ("train_path", "val_path"):
        path = cfg.data.get(key)
        streamed_dir = key == "train_path" and cfg.data.get("streaming") and Path(str(path)).is_dir()
        if path and Path(path).is_dir() and not streamed_dir:
            raise ConfigError(
                f"data.{key}={path} is a directory; pass a FASTA file (a directory of them needs data.streaming=true)"
            )
        if path and not Path(path).is_file() and not streamed_dir:
            raise ConfigError(f"data.{key}={path} does not exist; pass the path of a FASTA file (.fasta or .fasta.gz)")
        fasta = path and Path(path).suffix not in (".parquet", ".pq")  # Parquet's own reader checks its rows
        if fasta and not streamed_dir and not has_residue_line(path):  # found here, before a run dir is made
            raise DataError(f"{path} holds no sequence (only headers?); pass a FASTA with sequences")
    packing = cfg.data.get("packing", False) is True  # `auto` picks packing only where its rules hold (plan.py)
    if packing and cfg.model.architecture.get("attention_probs_dropout_prob", 0.0) > 0:
        raise ConfigError(
            "data.packing=true needs model.architecture.attention_probs_dropout_prob=0.0 (ESM-2 trains without it)"
        )
    if is_fp16(plan.precision) and plan.optimizer.get("fused") and cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "a fused optimizer unscales fp16 gradients inside its step, so they cannot be clipped before it; "
            "set optimizer.fused=auto or false (or trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null)"
        )
    if not cfg.get("plan_only"):  # last: a specific error first; a plan (e.g. on a login node) trains nothing
        check_devices(cfg.trainer)  # after the specific errors about devices (e.g. FSDP on CPUs)
        check_memory(cfg, plan)
    if cfg.scheduler.get("warmup_steps", 0) > cfg.trainer.max_steps:
        log.warning(
            "scheduler.warmup_steps=%s exceeds trainer.max_steps=%s: the LR never reaches optimizer.lr",
            cfg.scheduler.warmup_steps,
            cfg.trainer.max_steps,
        )
    return plan


def check_fsdp(cfg: DictConfig, plan: RunPlan) -> RunPlan:
    """trainer=fsdp: refuse what has not run under FSDP (each in one line); model.compile=auto resolves to off."""
    strategy = cfg.trainer.get("strategy")
    if "fsdp" not in str(strategy).lower():
        return plan
    if cfg.trainer.accelerator == "cpu":  # (a SLURM login node has no GPU)
        raise ConfigError(
            "trainer=fsdp needs GPUs (Lightning's FSDP strategy refuses the CPU); on CPU use trainer=ddp "
            "trainer.accelerator=cpu"
        )
    kind = strategy.get("state_dict_type", "full") if isinstance(strategy, DictConfig) else "full"
    if kind != "full":
        raise ConfigError(
            f"trainer.strategy.state_dict_type={kind} is not supported: Lightning writes sharded checkpoints in place "
            "as a directory that resume= cannot read; use trainer.strategy.state_dict_type=full"
        )
    if plan.gpu is not None and plan.gpu.capability < BF16_CAPABILITY:
        raise ConfigError(
            "trainer=fsdp trains in bf16-mixed only, which needs a GPU of compute capability 8.0+; "
            "use trainer=ddp on this GPU (16-mixed with loss scaling)"
        )
    if str(plan.precision).startswith("16"):
        raise ConfigError(
            f"trainer=fsdp with precision {plan.precision} is not supported (Lightning's FSDP fp16 cannot clip "
            "unscaled gradients); use trainer.precision=bf16-mixed (compute capability 8.0+), or trainer=ddp for fp16"
        )
    if cfg.model.get("compile") is True:
        raise ConfigError("trainer=fsdp with model.compile=true has not been run yet; set model.compile=false")
    if plan.compile:  # model.compile=auto
        log.info("model.compile=auto: off under trainer=fsdp (FSDP with torch.compile has not been run yet)")
    return dataclasses.replace(plan, compile=False)


def check_checkpoint_matches(cfg: DictConfig) -> None:
    """The checkpoint to continue from must load safely and hold the requested architecture."""
    if Path(cfg.ckpt_path).is_dir():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is a directory; pass a .ckpt file, or resume=<run dir>")
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass the path of a .ckpt file")
    checkpoint = load_checkpoint(cfg.ckpt_path, mmap=True)  # metadata only: the tensors stay on disk
    if checkpoint.get(FORMAT_KEY, 1) < CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} was written by an older protein-mlm (format {checkpoint.get(FORMAT_KEY, 1)}) "
            "whose data position cannot be restored exactly; start a new run, or continue from its weights with "
            "model.init_from=<a directory written by scripts/export_hf.py>"
        )
    groups = len(checkpoint.get("optimizer_states", [{}])[0].get("param_groups", [])) or None
    wanted_groups = 2 if cfg.optimizer.get("no_decay_bias_and_norm") else 1
    if groups is not None and groups != wanted_groups:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} has {groups} optimizer parameter group(s), this config makes {wanted_groups} "
            "(optimizer.no_decay_bias_and_norm changed); continue with the setting the run started with"
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
