"""Will a run fit? A lower bound on training memory per process, checked against what the machine has.

A lower bound on purpose: it counts the training state and the per-token activations of the layers, not the
attention scores (which grow with sequence length squared unless a fused kernel avoids them), the allocator's
caching or the libraries; the default ESM-2 8M run measured 6.4 GB RSS on CPU against an estimate of 0.9 GB. So a
refusal means the run cannot fit, while passing does not promise that it will.
"""

from pathlib import Path

import torch

from protein_mlm.model.parallel import BYTES_PER_PARAMETER

# Activation bytes per (token x layer x hidden unit) kept for backward, below every measured peak once the training
# state (16 bytes per parameter) is taken off: ESM-2 35M at 16,384 tokens on CPU (bf16 autocast) about 100, ESM-2
# 650M at 16,384 tokens on an H200 (bf16) about 59. With activation checkpointing only each layer's input (4 bytes)
# is kept, plus one layer's activations while it is recomputed.
ACTIVATION_BYTES = 50
CHECKPOINTED_BYTES = 4


def training_bytes(
    parameters: int, layers: int, hidden: int, tokens: int, shards: int = 1, activation_checkpointing: bool = False
) -> tuple[float, float]:
    """(training state, activations) in bytes per process; `shards` > 1 under FSDP."""
    state = sum(BYTES_PER_PARAMETER.values()) * parameters / shards
    if activation_checkpointing:
        activations = tokens * hidden * (CHECKPOINTED_BYTES * layers + ACTIVATION_BYTES)
    else:
        activations = tokens * hidden * layers * ACTIVATION_BYTES
    return state, activations


def available_bytes(on_gpu: bool, device: int = 0) -> float | None:
    """Free memory of GPU `device` (the run's own), or the host's available RAM (Linux); None when unknown."""
    if on_gpu:
        return float(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None
