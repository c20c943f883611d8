"""Check a run's config before anything is built or written: the rules a valid run must follow, each with the fix
in its one-line error, and the resolved `RunPlan` (plan.py) that the run then reads."""

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from protein_mlm.data.options import check_data_options
from protein_mlm.errors import ConfigError
from protein_mlm.model import memory
from protein_mlm.plan import RunPlan, resolve
from protein_mlm.rules import ValueRule, check_value
from protein_mlm.training.checkpoint import CHECKPOINT_FORMAT, FORMAT_KEY, check_init_from, load_checkpoint

log = logging.getLogger(__name__)

# The value rules of a run, in one table (the data.* ones are data/options.py's): key, type (None: may be null), the
# requirement, an example.
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
)
ABSENT = object()


def check_values(cfg: DictConfig) -> None:
    """Each VALUE_RULES key has its type and range; the message names the key, the value and an example."""
    for rule in VALUE_RULES:
        value = OmegaConf.select(cfg, rule.key, default=ABSENT)
        if value is not ABSENT:
            check_value(rule, value)
    check_data_options(cfg.data)
    if cfg.model.get("compile", False) not in (True, False, "auto"):
        raise ConfigError(f"model.compile={cfg.model.compile!r} must be true, false or auto; e.g. model.compile=auto")
    data = cfg.data
    arch = cfg.model.architecture
    if arch.get("position_embedding_type") == "absolute" and data.max_length > arch.max_position_embeddings - 2:
        raise ConfigError(
            f"data.max_length={data.max_length} exceeds what model={cfg.model.name}'s learned positions cover "
            f"({arch.max_position_embeddings - 2} tokens); use data.max_length={arch.max_position_embeddings - 2}"
        )


def check_memory(cfg: DictConfig, plan: RunPlan | None = None) -> None:
    """Refuse a run whose estimated training memory exceeds what this machine (or GPU) has available."""
    if not cfg.get("perf", {}).get("check_memory", True):
        return
    plan = plan or resolve(cfg)
    arch, data, on_gpu = cfg.model.architecture, cfg.data, plan.on_gpu
    available = memory.available_bytes(on_gpu)
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
    for key in ("train_path", "val_path"):
        path = cfg.data.get(key)
        streamed_dir = key == "train_path" and cfg.data.get("streaming") and Path(str(path)).is_dir()
        if path and Path(path).is_dir() and not streamed_dir:
            raise ConfigError(
                f"data.{key}={path} is a directory; pass a FASTA file (a directory of them needs data.streaming=true)"
            )
        if path and not Path(path).is_file() and not streamed_dir:
            raise ConfigError(f"data.{key}={path} does not exist; pass the path of a FASTA file (.fasta or .fasta.gz)")
    strategy = cfg.trainer.get("strategy")
    if "fsdp" in str(strategy).lower() and cfg.trainer.accelerator == "cpu":  # (a SLURM login node has no GPU)
        raise ConfigError(
            "trainer=fsdp needs GPUs (Lightning's FSDP strategy refuses the CPU); on CPU use trainer=ddp "
            "trainer.accelerator=cpu"
        )
    packing = cfg.data.get("packing", False) is True  # `auto` picks packing only where its rules hold (plan.py)
    if packing and cfg.model.architecture.get("attention_probs_dropout_prob", 0.0) > 0:
        raise ConfigError(
            "data.packing=true needs model.architecture.attention_probs_dropout_prob=0.0 (ESM-2 trains without it)"
        )
    fp16 = plan.precision in ("16-mixed", 16, "16")
    if fp16 and cfg.optimizer.get("fused") and cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "a fused optimizer unscales fp16 gradients inside its step, so they cannot be clipped before it; "
            "set optimizer.fused=false (or trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null)"
        )
    if not cfg.get("plan_only"):  # last: a specific error first; a plan (e.g. on a login node) trains nothing
        check_memory(cfg, plan)
    if cfg.scheduler.get("warmup_steps", 0) > cfg.trainer.max_steps:
        log.warning(
            "scheduler.warmup_steps=%s exceeds trainer.max_steps=%s: the LR never reaches optimizer.lr",
            cfg.scheduler.warmup_steps,
            cfg.trainer.max_steps,
        )
    return plan


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
