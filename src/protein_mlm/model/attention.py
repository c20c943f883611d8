"""PyTorch attention for ESM without host syncs, for padded and packed batches, registered with transformers.

transformers' stock "sdpa" mask builder asks `padding_mask.all()` on every forward (to drop an all-true mask); on
a GPU that read stalls the host until the device has caught up. Ours always builds the padding mask from the 2D
mask. Packed batches (packing.py) arrive with `cu_seq_lens_q`: varlen flash attention on CUDA, a block-diagonal
mask elsewhere. The module tree and `state_dict` keys stay those of `EsmForMaskedLM`; only function names differ.

transformers' own implementations ignore `cu_seq_lens_*` (eager, flex) or need a package and an 8.0+ GPU
(flash_attention_2): of those, only `eager` takes packed rows, through an additive block-diagonal mask
(`segment_bias`); preflight refuses packing with the others.
"""

import inspect
import warnings
from functools import cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from protein_mlm.model.perf import cpu_flags

NAME = "protein_mlm_sdpa"  # what `attn_implementation: sdpa` in a model config selects
# The `attn_implementation` values this project trains with; PACKED: those whose packed rows attend within each
# sequence only (tests/test_packing.py proves each one against the sequences alone).
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")
PACKED = ("sdpa", "eager")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# PyTorch's CPU flash attention ran fp32 faster than bf16 on an AVX512-BF16 CPU without AMX (esm2_8m's head
# dim 16: 134 vs 156-174 ms forward + backward, casts included; benchmarks/README.md); with AMX, bf16 stays.
CPU_ATTENTION_IN_FP32 = "amx_bf16" not in cpu_flags()


def padding_mask(*args, attention_mask=None, **kwargs):
    """The boolean (batch, 1, q, kv) padding mask, or None without a 2D mask; never inspects its values."""
    if attention_mask is None:
        return None
    kwargs["allow_is_bidirectional_skip"] = False  # the skip test is the `.all()` host read
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def segment_bias(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, T, T) mask for transformers' eager attention: 0 within a segment, the dtype's minimum across."""
    same = segment_ids.unsqueeze(-1).eq(segment_ids.unsqueeze(-2)).unsqueeze(1)
    return torch.zeros(same.shape, dtype=dtype, device=segment_ids.device).masked_fill(~same, torch.finfo(dtype).min)


def block_diagonal_attention(query, key, value, segment_ids: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Reference path: SDPA where a token attends only to its own segment; (B, T, heads, dim) out."""
    mask = segment_ids.unsqueeze(-1).eq(segment_ids.unsqueeze(-2)).unsqueeze(1)  # (B, 1, T, T)
    dtype = value.dtype
    out = F.scaled_dot_product_attention(query.to(dtype), key.to(dtype), value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


@cache
def _varlen_function():
    """The installed torch's varlen flash attention if it takes `scale` (ESM passes scaling=1.0), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9
    except ImportError:
        return None
    return varlen_attn if "scale" in inspect.signature(varlen_attn).parameters else None


def varlen_available() -> bool:
    """Whether this torch has varlen flash attention (used on CUDA); asks nothing of the GPU."""
    return _varlen_function() is not None


def varlen_attention(query, key, value, cu_seqlens, max_seqlen: int, scaling: float | None, kernel=None):
    """Flash attention over the flattened tokens, one segment per sequence; (B, T, heads, dim) out."""
    batch, heads, tokens, dim = query.shape
    dtype = value.dtype  # ESM's rotary path returns fp32 q and k under autocast; flash takes one 16-bit dtype

    def flat(x):
        return x.to(dtype).transpose(1, 2).reshape(batch * tokens, heads, dim)

    cu = cu_seqlens.to(torch.int32)
    out = (kernel or _varlen_function())(
        flat(query), flat(key), flat(value), cu, cu, max_seqlen, max_seqlen, scale=scaling
    )
    return out.view(batch, tokens, heads, dim)


def varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float | None = None):
    """`varlen_attn`'s contract on any device: (tokens, heads, dim) in and out, attention within each segment of
    `cu_seq_q`. Tests run the packed path through it on CPU, so `cu_seqlens` reaches compiled graphs as on CUDA."""
    positions = torch.arange(query.shape[0], device=query.device)
    segment = torch.searchsorted(cu_seq_q[1:].to(positions.dtype), positions, right=True)
    mask = segment.unsqueeze(0).eq(segment.unsqueeze(1))  # (tokens, tokens)
    q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # (heads, tokens, dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def varlen_kernel(query, value):
    """The varlen kernel for these tensors (flash on CUDA in 16-bit), or None for the block-diagonal reference."""
    if query.is_cuda and value.dtype in FLASH_DTYPES:
        return _varlen_function()
    return None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for padded batches; for packed ones, attention within each sequence only."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None and query.device.type == "cpu" and CPU_ATTENTION_IN_FP32 and value.dtype in FLASH_DTYPES:
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(
                module, query.float(), key.float(), value.float(), attention_mask, dropout, scaling, **kwargs
            )
        return out.to(value.dtype), weights
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise ValueError("packed batches need attention_probs_dropout_prob: 0.0 (as ESM-2)")
    kernel = varlen_kernel(query, value)
    if kernel is not None:
        return varlen_attention(query, key, value, cu_seqlens, kwargs["max_length_q"], scaling, kernel), None
    if query.is_cuda:
        warnings.warn("packed batches: no varlen flash attention in this torch; using the reference path", stacklevel=2)
    return block_diagonal_attention(query, key, value, kwargs["segment_ids"], scaling), None


def register() -> str:
    """Register the attention and its mask builder (idempotent); returns the implementation name."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, padding_mask)
    return NAME


register()  # at import, so processes that unpickle a model (spawned DDP ranks, workers) find the name too
