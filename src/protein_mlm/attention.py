"""PyTorch SDPA for ESM without host syncs, registered with transformers under its own name.

transformers' stock "sdpa" mask builder asks `padding_mask.all()` on every forward (to drop an all-true mask);
on a GPU that read stalls the host until the device has caught up. Ours always builds the padding mask from the
2D mask (the module tree and `state_dict` keys stay those of `EsmForMaskedLM`; only the function names differ).
"""

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

NAME = "protein_mlm_sdpa"  # what `attn_implementation: sdpa` in a model config selects


def padding_mask(*args, attention_mask=None, **kwargs):
    """The boolean (batch, 1, q, kv) padding mask, or None without a 2D mask; never inspects its values."""
    if attention_mask is None:
        return None
    kwargs["allow_is_bidirectional_skip"] = False  # the skip test is the `.all()` host read
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the attention and its mask builder (idempotent); returns the implementation name."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, sdpa_attention_forward)
        AttentionMaskInterface.register(NAME, padding_mask)
    return NAME


register()  # at import, so processes that unpickle a model (spawned DDP ranks, workers) find the name too
