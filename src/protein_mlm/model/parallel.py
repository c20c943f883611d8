"""Multi-GPU strategies built from plain config values, and the bytes per parameter that training keeps."""

from pytorch_lightning.strategies import FSDPStrategy
from transformers.models.esm.modeling_esm import EsmLayer

# Bytes per parameter kept for training with AdamW under bf16 mixed precision: fp32 weights (4), fp32 gradients (4),
# Adam's two fp32 moments (8). FSDP (FULL_SHARD) splits all 16 over the GPUs; DDP keeps all 16 on every GPU.
BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "adam_states": 8}


def fsdp_strategy(
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    cpu_offload: bool = False,
) -> FSDPStrategy:
    """FSDP with each EsmLayer as a unit of sharding (gathered for its forward/backward only), optionally recomputed."""
    return FSDPStrategy(
        auto_wrap_policy={EsmLayer},
        activation_checkpointing_policy={EsmLayer} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
    )
