"""fair-esm weights into Hugging Face's EsmForMaskedLM, by transformers' convert_esm.py name mapping: a live
fair-esm ESM2 module (`esm2_to_hf`) or a fair-esm `.pt` file, ESM-2 or ESM-1b/ESM-1v (`load_fair_esm`).

The files are read with torch.load(weights_only=True): tensors, plain containers and argparse.Namespace (their
settings) only, so a file cannot run code when it is read. Nothing here imports fair-esm.
"""

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from transformers import EsmForMaskedLM

from protein_mlm.alphabet import MASK_ID
from protein_mlm.errors import ConfigError
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
    # ESM-1b / ESM-1v only: learned positions and the LayerNorm before the first layer.
    "embed_positions.weight": "esm.embeddings.position_embeddings.weight",
    "emb_layer_norm_before.weight": "esm.embeddings.layer_norm.weight",
    "emb_layer_norm_before.bias": "esm.embeddings.layer_norm.bias",
}
REGRESSION = ("contact_head.regression.weight", "contact_head.regression.bias")
PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")  # fairseq's prefixes, as fair-esm strips them


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
    return load_mapped(build_model(architecture), esm2.state_dict(), "fair-esm -> HF")


def load_mapped(model: EsmForMaskedLM, fair_state: dict[str, torch.Tensor], where: str) -> EsmForMaskedLM:
    """Copy a fair-esm state dict (prefixes stripped) into `model` by name; every HF weight must be given."""
    state = {hf_name(k): v for k, v in fair_state.items() if hf_name(k) is not None}
    state.pop("lm_head.decoder.weight", None)  # tied to the word embeddings, which carry it
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith(("inv_freq", "position_ids")) and k != "lm_head.decoder.weight"]
    if left or unexpected:
        raise ConfigError(f"{where}: weights missing {left[:4]}, unexpected {unexpected[:4]}; pass an intact file")
    return model.eval()


def read_pt(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) allowing argparse.Namespace; anything else is refused, never unpickled."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds; every one is a refusal of this file)
        text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))  # torch's message carries ANSI colours
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        reason = f"it holds a {found.group(1)} object" if found else text[:160]
        raise ConfigError(
            f"cannot read {path} as fair-esm weights ({reason}); only tensors and settings are read, since "
            "unpickling other objects can run code: pass an ESM-2/ESM-1b/ESM-1v .pt or an HF directory"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path} is not a fair-esm model file (no 'model' weights); pass an ESM-2/ESM-1b/ESM-1v .pt")
    return data


def fair_esm_architecture(data: dict[str, Any], path: Path) -> tuple[dict[str, Any], bool]:
    """The HF architecture of a fair-esm file, and whether it is ESM-1b/1v (learned positions)."""
    if "cfg" in data:  # ESM-2 (fairseq's newer layout)
        cfg = data["cfg"]["model"]
        layers, width, heads = cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads
        return {
            "num_hidden_layers": layers,
            "hidden_size": width,
            "num_attention_heads": heads,
            "intermediate_size": 4 * width,
            "position_embedding_type": "rotary",
            "emb_layer_norm_before": False,
            "token_dropout": bool(getattr(cfg, "token_dropout", True)),
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": 1e-5,
        }, False
    args = data.get("args")
    arch = getattr(args, "arch", None)
    if arch == "msa_transformer":
        raise ConfigError(f"{path} is an MSA Transformer, which reads alignments; pass an ESM-2, ESM-1b or ESM-1v .pt")
    if arch != "roberta_large":
        raise ConfigError(f"{path} is a fair-esm {arch!r} model; only ESM-2, ESM-1b and ESM-1v .pt files are read")
    state = data["model"]
    return {
        "num_hidden_layers": args.layers,
        "hidden_size": args.embed_dim,
        "num_attention_heads": args.attention_heads,
        "intermediate_size": args.ffn_embed_dim,
        "position_embedding_type": "absolute",
        "max_position_embeddings": args.max_positions + 2,  # fair-esm's: positions start after <pad> (id 1)
        "emb_layer_norm_before": any("emb_layer_norm_before" in k for k in state),
        "token_dropout": bool(getattr(args, "token_dropout", False)),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-5,
    }, True


def load_fair_esm(path: str | Path, attn_implementation: str = "sdpa") -> tuple[EsmForMaskedLM, bool]:
    """A fair-esm `.pt` (with its `-contact-regression.pt` beside it when there is one) as an EsmForMaskedLM in
    eval mode, and whether its contact head is fitted (the regression file was found, or the weights hold it)."""
    path = Path(path)
    data = read_pt(path)
    architecture, v1 = fair_esm_architecture(data, path)
    state = {PREFIX.sub("", k): v for k, v in data["model"].items()}
    regression = path.with_name(f"{path.stem}-contact-regression.pt")
    if regression.is_file():
        state.update(read_pt(regression)["model"])
    trained = all(k in state for k in REGRESSION)
    model = build_model(dict(architecture, attn_implementation=attn_implementation))
    if not trained:  # as fair-esm: without regression weights the contact head is unfitted (here: as initialised)
        head = model.esm.contact_head.regression
        state.update(dict(zip(REGRESSION, (head.weight.detach().clone(), head.bias.detach().clone()))))
    if v1:  # fair-esm zeroes the <mask> embedding of ESM-1b/1v files when it loads them ("for token drop")
        state["embed_tokens.weight"] = state["embed_tokens.weight"].clone()
        state["embed_tokens.weight"][MASK_ID] = 0
    return load_mapped(model, state, str(path)), trained
