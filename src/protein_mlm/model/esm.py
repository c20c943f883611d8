"""Build a Hugging Face `EsmForMaskedLM` from a plain architecture dict (never downloads weights)."""

import importlib.util
import logging
import os
import shutil
from typing import Any

import torch
from transformers import EsmConfig, EsmForMaskedLM

from protein_mlm.alphabet import MASK_ID, PAD_ID, VOCAB
from protein_mlm.model import attention
from protein_mlm.model.fast_layer import use_fast_layers

log = logging.getLogger(__name__)


def esm_config(architecture: dict[str, Any]) -> EsmConfig:
    """EsmConfig with the shipped alphabet's size and special ids; the dict gives the architecture."""
    arch = dict(architecture)
    attn_implementation = arch.pop("attn_implementation", "sdpa")
    config = EsmConfig(vocab_size=len(VOCAB), pad_token_id=PAD_ID, mask_token_id=MASK_ID, **arch)
    # "sdpa" is PyTorch's SDPA through our sync-free mask builder (attention.py); any other name is transformers'.
    config._attn_implementation = attention.register() if attn_implementation == "sdpa" else attn_implementation
    return config


def build_model(
    architecture: dict[str, Any],
    device: str | torch.device | None = None,
    activation_checkpointing: bool = False,
    fast_layers: bool = False,
) -> EsmForMaskedLM:
    """A freshly initialised ESM masked-LM; `device="meta"` builds the shape only (free, for counting)."""
    with torch.device(device or "cpu"):
        model = EsmForMaskedLM(esm_config(architecture))
    if fast_layers:  # the same layers and weights with a faster forward (fast_layer.py)
        use_fast_layers(model)
    if activation_checkpointing:  # keep only each layer's input; recompute the rest in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The contact-prediction head gets no gradient from MLM: freezing it keeps the HF checkpoint layout
    # (so exports load in `from_pretrained`) without DDP's unused-parameter error.
    model.esm.contact_head.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once), as a checkpoint stores them."""
    return sum(p.numel() for p in model.parameters())


def can_compile(on_gpu: bool, quiet: bool = False) -> bool:
    """Whether torch.compile can build kernels here (Triton on GPUs, a C++ compiler on CPUs); warns when not."""
    if on_gpu:
        missing = None if importlib.util.find_spec("triton") else "Triton is not installed"
    else:
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        missing = None if any(c and shutil.which(c) for c in compilers) else "no C++ compiler (g++/clang++) on PATH"
    if missing:
        log.log(logging.INFO if quiet else logging.WARNING, "model.compile ignored: %s; training runs eagerly", missing)
    return missing is None
