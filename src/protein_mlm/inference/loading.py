"""One loader for every model the project makes or reads: a run dir, a .ckpt, an HF export, a local HF ESM dir,
a fair-esm .pt file."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import EsmConfig, EsmForMaskedLM

from protein_mlm.alphabet import VOCAB
from protein_mlm.errors import ConfigError
from protein_mlm.model import attention
from protein_mlm.model.checkpoints import (
    CONTACT_HEAD_KEY,
    describe_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)
from protein_mlm.model.fair_esm import load_fair_esm

# EsmConfig fields a MaskedLMModule's architecture dict carries (model.esm_config adds the alphabet).
CONFIG_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "position_embedding_type",
    "max_position_embeddings",
    "emb_layer_norm_before",
    "token_dropout",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


@dataclass
class LoadedModel:
    """A model in eval mode, where it came from, and whether its contact head was ever trained."""

    model: EsmForMaskedLM
    contact_head_trained: bool
    source: Path
    description: str
    architecture: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def max_tokens(self) -> int | None:
        """Tokens one pass can take: learned positions end (HF numbers them from pad id + 1); rotary ones do not."""
        config = self.model.config
        if config.position_embedding_type != "absolute":
            return None
        return config.max_position_embeddings - config.pad_token_id - 1


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


HUB_NAME = re.compile(r"^(?:[\w.-]+/)?(?:esm[\w.-]*)$", re.IGNORECASE)  # facebook/esm2_t6_8M_UR50D, esm1v_t33_...


def not_downloaded(location: str) -> str | None:
    """For a location that is not here but reads as a model name: nothing is downloaded, how to get a local copy."""
    if Path(location).exists() or not HUB_NAME.match(location):
        return None
    if "/" in location:
        return (
            f"{location} is not a local path, and nothing is downloaded here; fetch it once with "
            f"`huggingface-cli download {location} --local-dir <dir>` and pass that directory"
        )
    return (
        f"{location} is not a local path, and nothing is downloaded here; pass fair-esm's file "
        f"(~/.cache/torch/hub/checkpoints/{location}.pt after esm.pretrained.{location}()) or an HF directory"
    )


def resolve_model(location: str | Path) -> Path:
    """The file or directory to load: a HF directory or fair-esm .pt as given, a run dir's best checkpoint, a .ckpt
    as given."""
    path = Path(location)
    if is_hf_dir(path) or (path.is_file() and path.suffix == ".pt"):
        return path
    message = not_downloaded(str(location))
    if message:
        raise ConfigError(message)
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise ConfigError(
            f"{path} is neither a run dir (no checkpoints/) nor a Hugging Face model directory (no config.json); "
            "pass a run dir, a .ckpt file or a local Hugging Face ESM directory"
        )
    return resolve_checkpoint(path)


def hf_contact_head_trained(config: dict[str, Any]) -> bool:
    """A directory this project exported records whether its head was trained; any other (e.g. a downloaded
    facebook/esm2_*) comes from ESM's own training, whose contact head is fitted."""
    return bool(config.get(CONTACT_HEAD_KEY, True))


def _attn_name(attn_implementation: str) -> str:
    return attention.register() if attn_implementation == "sdpa" else attn_implementation


def _check_alphabet(directory: Path, config: dict[str, Any]) -> None:
    """Our tokenizer is ESM-2's alphabet: a model with another vocabulary would read the wrong tokens."""
    vocab_file = directory / "vocab.txt"
    vocab = vocab_file.read_text().split() if vocab_file.is_file() else None
    if config.get("vocab_size") != len(VOCAB) or (vocab is not None and vocab != VOCAB):
        raise ConfigError(
            f"{directory} has another vocabulary (vocab_size {config.get('vocab_size')}) than ESM-2's 33 tokens; "
            "pass an ESM-1b/ESM-2 style model"
        )


def load_hf_dir(directory: Path, attn_implementation: str) -> LoadedModel:
    """A local Hugging Face ESM directory, offline (local_files_only: nothing is ever fetched)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {directory / 'config.json'} ({e}); pass an intact model directory") from None
    if config.get("model_type") != "esm":
        raise ConfigError(f"{directory} holds a {config.get('model_type')!r} model, not ESM; pass an ESM directory")
    _check_alphabet(directory, config)
    try:
        model = EsmForMaskedLM.from_pretrained(
            directory, local_files_only=True, attn_implementation=_attn_name(attn_implementation)
        )
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"cannot load the model in {directory} ({reason}); pass an intact ESM directory") from None
    esm_config: EsmConfig = model.config
    architecture = {field: getattr(esm_config, field) for field in CONFIG_FIELDS}
    trained = hf_contact_head_trained(config)
    return LoadedModel(model.eval(), trained, directory, str(directory), architecture)


def load_ckpt(path: Path, attn_implementation: str) -> LoadedModel:
    """A training checkpoint; its contact head is trained only if it came with the weights it started from."""
    checkpoint = load_checkpoint(path)
    architecture = dict(checkpoint["hyper_parameters"]["architecture"], attn_implementation=attn_implementation)
    model = model_from_checkpoint(path, checkpoint=checkpoint, architecture=architecture)
    trained = bool(checkpoint.get(CONTACT_HEAD_KEY, False))
    return LoadedModel(
        model.eval(), trained, path, describe_checkpoint(path), checkpoint["hyper_parameters"]["architecture"]
    )


def load_pt(path: Path, attn_implementation: str) -> LoadedModel:
    """A fair-esm .pt (ESM-2, ESM-1b, ESM-1v), converted by name; its contact head is fitted if the
    -contact-regression.pt file lies beside it (or the weights hold it)."""
    model, trained = load_fair_esm(path, attn_implementation)
    architecture = {field: getattr(model.config, field) for field in CONFIG_FIELDS}
    return LoadedModel(model, trained, path, f"{path} (fair-esm)", architecture)


def load_model(location: str | Path, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load `location` (run dir, .ckpt, HF export, HF ESM dir or fair-esm .pt) as an EsmForMaskedLM in eval mode,
    on the CPU.

    `attn_implementation`: "sdpa" (this project's, for speed) or "eager" (attention weights, for contacts).
    """
    path = resolve_model(location)
    if is_hf_dir(path):
        loaded = load_hf_dir(path, attn_implementation)
    elif path.suffix == ".pt":
        loaded = load_pt(path, attn_implementation)
    else:
        loaded = load_ckpt(path, attn_implementation)
    loaded.model.requires_grad_(False)
    return loaded


def device_for(nogpu: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not nogpu else "cpu")
