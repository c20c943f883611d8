"""Multi-GPU strategies built from plain config values, and the bytes per parameter that training keeps."""

import dataclasses

import torch
from pytorch_lightning.strategies import FSDPStrategy
from transformers.models.esm.modeling_esm import EsmLayer

from protein_mlm.errors import ConfigError

# Bytes per parameter kept for training with AdamW under bf16 mixed precision: fp32 weights (4), fp32 gradients (4),
# Adam's two fp32 moments (8). FSDP (FULL_SHARD) splits all 16 over the GPUs; DDP keeps all 16 on every GPU.
BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "adam_states": 8}


class FSDPStrategyFp32Buffers(FSDPStrategy):
    """Lightning's FSDP whose mixed-precision policy leaves buffers in fp32.

    Lightning's policy casts buffers to the compute dtype too, rounding ESM's rotary `inv_freq` to bf16 (a phase
    error up to ~0.2 rad at 1,000 tokens for esm2_150m); DDP, export and init_from use the exact fp32 frequencies.
    Parameters and gradient reduction keep the dtype of the run's precision (the plugin Lightning builds from it).
    """

    @property
    def mixed_precision_config(self):
        policy = super().mixed_precision_config
        return None if policy is None else dataclasses.replace(policy, buffer_dtype=torch.float32)


def fsdp_strategy(
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    cpu_offload: bool = False,
) -> FSDPStrategy:
    """FSDP with each EsmLayer as a unit of sharding (gathered for its forward/backward only), optionally recomputed."""
    if state_dict_type != "full":  # preflight refuses it first; this guards callers below the CLI
        raise ConfigError(f"trainer.strategy.state_dict_type={state_dict_type} is not supported; use full")
    return FSDPStrategyFp32Buffers(
        auto_wrap_policy={EsmLayer},
        activation_checkpointing_policy={EsmLayer} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
    )
