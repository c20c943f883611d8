"""Multi-GPU strategies built from plain config values, and the bytes per parameter that training keeps."""

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision
from transformers.models.esm.modeling_esm import EsmLayer

from protein_mlm.errors import ConfigError

# Bytes per parameter kept for training with AdamW under bf16 mixed precision: fp32 weights (4), fp32 gradients (4),
# Adam's two fp32 moments (8). FSDP (FULL_SHARD) splits all 16 over the GPUs; DDP keeps all 16 on every GPU.
BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "adam_states": 8}
HALF = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the mixed precisions FSDP computes in


def fsdp_mixed_precision(precision: str) -> MixedPrecision | None:
    """FSDP's policy for `precision`: parameters and gradient reduction in 16 bits, buffers left in fp32.

    Lightning's own policy casts buffers too, rounding the rotary `inv_freq` to bf16 (a phase error up to ~0.2 rad
    at 1,000 tokens for esm2_150m); DDP, export and init_from use the exact fp32 frequencies, and so does this.
    """
    if str(precision) not in HALF:
        return None  # 32-true: Lightning's fp32 policy casts nothing
    half = HALF[str(precision)]
    return MixedPrecision(param_dtype=half, reduce_dtype=half, buffer_dtype=torch.float32)


def fsdp_strategy(
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    cpu_offload: bool = False,
    precision: str = "bf16-mixed",
) -> FSDPStrategy:
    """FSDP with each EsmLayer as a unit of sharding (gathered for its forward/backward only), optionally recomputed."""
    if state_dict_type != "full":  # preflight refuses it first; this guards callers below the CLI
        raise ConfigError(f"trainer.strategy.state_dict_type={state_dict_type} is not supported; use full")
    return FSDPStrategy(
        auto_wrap_policy={EsmLayer},
        activation_checkpointing_policy={EsmLayer} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        mixed_precision=fsdp_mixed_precision(precision),
    )
