"""What each kind of checkpoint holds and how the model is read out of it: a training `.ckpt` (loaded safely,
weights_only), a run dir (its best checkpoint, else last.ckpt), a Hugging Face directory (export and init_from) and
a fair-esm `.pt`. Training writes them and inference reads them; both come here, so neither imports the other."""

import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import EsmForMaskedLM

from protein_mlm.alphabet import load_tokenizer
from protein_mlm.errors import ConfigError
from protein_mlm.model.esm import build_model
from protein_mlm.model.fair_esm import load_fair_esm

# Version 2: the data position lives in the training loader's state (loader.ResumableLoader), counters are at an
# update boundary. A checkpoint without it (or older) cannot continue a run exactly.
CHECKPOINT_FORMAT = 2
FORMAT_KEY = "protein_mlm_format"
# Whether the model's contact-prediction head was ever fitted: MLM gives it no gradient (model.build_model freezes
# it), so it is trained only when the weights came from a model that had one (model.init_from=<ESM-2 dir>). Kept
# in checkpoints and in exported config.json files, so inference can refuse contacts from an untrained head.
CONTACT_HEAD_KEY = "protein_mlm_contact_head_trained"
BEST_LOSS = re.compile(r"val_loss(\d+(?:\.\d+)?)")

ARCHITECTURE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "position_embedding_type",
    "emb_layer_norm_before",
    "vocab_size",
)


def best_checkpoint(directory: Path) -> Path | None:
    """The `best-*.ckpt` with the lowest validation loss in its name (the newest where a name carries none)."""

    def rank(path: Path) -> tuple[float, float]:
        match = BEST_LOSS.search(path.name)
        return (float(match.group(1)) if match else float("inf"), -path.stat().st_mtime)

    candidates = sorted(directory.glob("best-*.ckpt"), key=rank)
    return candidates[0] if candidates else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file as given, or for a run dir its best checkpoint by val/loss (else last.ckpt)."""
    path = Path(path)
    if path.is_dir():
        path = best_checkpoint(path / "checkpoints") or path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass a .ckpt file or a run dir with checkpoints/")
    return path


def describe_checkpoint(path: Path) -> str:
    """`path` and which of a run's checkpoints it is, for messages."""
    if path.name.startswith("best-"):
        return f"{path} (the run's best by val/loss)"
    return f"{path} (the run's latest)" if path.name == "last.ckpt" else str(path)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True: plain containers and tensors only, never arbitrary objects.

    `mmap=True` maps the tensors instead of reading them: checks that need only the metadata stay cheap.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"cannot load checkpoint {path} ({reason}); is it a complete protein-mlm .ckpt?") from None
    if "state_dict" not in checkpoint or "architecture" not in checkpoint.get("hyper_parameters", {}):
        raise ConfigError(f"{path} is not a protein-mlm checkpoint (no state_dict/architecture); pass one from a run")
    return checkpoint


def model_from_checkpoint(
    path: str | Path, checkpoint: dict[str, Any] | None = None, architecture: dict[str, Any] | None = None
) -> EsmForMaskedLM:
    """The EsmForMaskedLM a training checkpoint holds (`architecture` overrides the saved one, e.g. its attention)."""
    checkpoint = checkpoint or load_checkpoint(path)
    model = build_model(architecture or checkpoint["hyper_parameters"]["architecture"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model


def export_hf(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face model directory (model + tokenizer) that from_pretrained loads offline."""
    out_dir = Path(out_dir)
    source = resolve_checkpoint(checkpoint_path)
    print(f"Exporting {describe_checkpoint(source)}", flush=True)
    checkpoint = load_checkpoint(source)
    model = model_from_checkpoint(source, checkpoint=checkpoint)
    setattr(model.config, CONTACT_HEAD_KEY, bool(checkpoint.get(CONTACT_HEAD_KEY, False)))  # goes into config.json
    model.save_pretrained(out_dir)
    load_tokenizer().save_pretrained(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():  # safetensors writes 0600; a model directory is meant to be shared
        if path.is_file():
            path.chmod(0o666 & ~umask)
    return out_dir


def check_init_from(directory: str | Path) -> Path:
    """model.init_from must be a local Hugging Face model directory (its config.json at least) or a fair-esm .pt."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix == ".pt":
        return directory
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"model.init_from={directory} holds no config.json; pass a local Hugging Face ESM directory "
            "or a fair-esm .pt file"
        )
    return directory


def load_pretrained_into(model: EsmForMaskedLM, directory: str | Path) -> bool:
    """Copy the weights of a local Hugging Face ESM directory into `model` (the architectures must match); returns
    whether its contact head was trained (a directory without this project's marker is ESM's own: trained)."""
    directory = check_init_from(directory)
    if directory.suffix == ".pt":
        pretrained, trained = load_fair_esm(directory)
        setattr(pretrained.config, CONTACT_HEAD_KEY, trained)
    else:
        pretrained = EsmForMaskedLM.from_pretrained(directory, local_files_only=True)
    differing = [
        f"{field}: {getattr(pretrained.config, field)} there, {getattr(model.config, field)} here"
        for field in ARCHITECTURE_FIELDS
        if getattr(pretrained.config, field) != getattr(model.config, field)
    ]
    if differing:
        raise ConfigError(
            f"model.init_from={directory} has another architecture ({'; '.join(differing)}); "
            "choose the matching model= preset"
        )
    model.load_state_dict(pretrained.state_dict())
    return bool(getattr(pretrained.config, CONTACT_HEAD_KEY, True))
