"""The forward of a packed batch (data/packing.py): `EsmForMaskedLM`'s own modules, sequences as varlen segments."""

from typing import Any

import torch

from protein_mlm.alphabet import MASK_ID
from protein_mlm.model import attention

MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM's token-dropout constant (the <mask> share of tokens in its training)


def packed_embeddings(model, input_ids: torch.Tensor, segment_ids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Word embeddings with ESM's token dropout per sequence (HF computes it per row, and a row is many sequences)."""
    embeddings = model.esm.embeddings.word_embeddings(input_ids)
    if not model.config.token_dropout:
        return embeddings
    is_mask = input_ids.eq(MASK_ID)
    embeddings = embeddings.masked_fill(is_mask.unsqueeze(-1), 0.0)
    flat = segment_ids.flatten()
    masked = torch.zeros(len(sizes), device=input_ids.device).index_add_(0, flat, is_mask.flatten().float())
    observed = (masked / sizes)[flat].view_as(input_ids)
    return (embeddings * ((1 - MASK_RATIO_TRAIN) / (1 - observed)).unsqueeze(-1)).to(embeddings.dtype)


def packed_logits(model, batch: dict[str, Any]) -> torch.Tensor:
    """`EsmForMaskedLM` logits of a packed batch; the module tree and weights are the model's own."""
    cu_seqlens = batch["cu_seqlens"]
    if not torch.compiler.is_compiling():  # its length varies by batch: one dynamic graph, not one per bucket
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).float()  # tokens per sequence (empty ones unused)
    position_ids = batch["position_ids"]
    if model.config.position_embedding_type == "absolute":  # ESM-1b's learned positions start after the pad id
        position_ids = position_ids + model.config.pad_token_id + 1
    words = packed_embeddings(model, batch["input_ids"], batch["segment_ids"], sizes)
    # EsmModel skips its embedding module when given inputs_embeds: add positions (and any LayerNorm) here.
    embeddings = model.esm.embeddings(inputs_embeds=words, position_ids=position_ids)
    implementation = model.config._attn_implementation
    if implementation == "eager":  # it ignores cu_seqlens: a block-diagonal mask keeps each sequence to itself
        masks = {"attention_mask": attention.segment_bias(batch["segment_ids"])}
    elif implementation == attention.NAME:
        masks = {}
    else:  # preflight refuses these first; never let packed rows attend across sequences
        raise ValueError(f"packed batches need attn_implementation sdpa or eager, not {implementation}")
    # No position_ids to the model: absolute positions are in `embeddings` already, rotary is relative (offsets
    # within a row leave q.k unchanged), and transformers >= 5.2x reads packed position_ids with a host sync
    # (`find_packed_sequence_indices(...).all()`) when it builds the mask.
    return model(
        inputs_embeds=embeddings,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=batch["max_seqlen"],
        max_length_k=batch["max_seqlen"],
        segment_ids=batch["segment_ids"],  # the attention's block-diagonal reference path reads it
        **masks,
    ).logits
