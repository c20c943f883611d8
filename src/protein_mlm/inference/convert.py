"""fair-esm weights into Hugging Face's EsmForMaskedLM (the mapping lives in protein_mlm.model.fair_esm, where
training's model.init_from reads it too)."""

from protein_mlm.model.fair_esm import esm2_to_hf, hf_name, load_fair_esm

__all__ = ["esm2_to_hf", "hf_name", "load_fair_esm"]
