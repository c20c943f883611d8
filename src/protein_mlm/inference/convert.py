"""fair-esm ESM-2 weights into Hugging Face's EsmForMaskedLM, by transformers' convert_esm.py name mapping."""

from typing import Any

import torch
from transformers import EsmForMaskedLM

from protein_mlm.model.esm import build_model

# fair-esm TransformerLayer -> HF EsmLayer parameter names (weights and biases alike).
LAYER_NAMES = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}
TOP_NAMES = {
    "embed_tokens.weight": "esm.embeddings.word_embeddings.weight",
    "emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.weight": "lm_head.decoder.weight",  # tied to the embeddings in both
    "lm_head.bias": "lm_head.bias",
    "contact_head.regression.weight": "esm.contact_head.regression.weight",
    "contact_head.regression.bias": "esm.contact_head.regression.bias",
}


def hf_name(name: str) -> str | None:
    """The HF name of a fair-esm ESM2 parameter; None for what HF recomputes (rotary frequencies)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if name.startswith("layers.") and "rot_emb" not in name:
        _, index, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"esm.encoder.layer.{index}.{LAYER_NAMES[module]}.{kind}"
    return None


def esm2_to_hf(esm2: torch.nn.Module, attn_implementation: str = "sdpa") -> EsmForMaskedLM:
    """An EsmForMaskedLM holding the weights of a fair-esm `esm.model.esm2.ESM2` (its alphabet is ours)."""
    architecture: dict[str, Any] = {
        "num_hidden_layers": esm2.num_layers,
        "hidden_size": esm2.embed_dim,
        "num_attention_heads": esm2.attention_heads,
        "intermediate_size": 4 * esm2.embed_dim,
        "position_embedding_type": "rotary",
        "emb_layer_norm_before": False,
        "token_dropout": esm2.token_dropout,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-5,  # torch's LayerNorm default, which fair-esm uses without apex
        "attn_implementation": attn_implementation,
    }
    model = build_model(architecture)
    state = {hf_name(k): v for k, v in esm2.state_dict().items() if hf_name(k) is not None}
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith("inv_freq") and k != "lm_head.decoder.weight"]
    if left or unexpected:
        raise ValueError(f"fair-esm -> HF: missing {left}, unexpected {unexpected}")
    return model.eval()
