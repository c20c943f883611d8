"""`evaluate(cfg)`: masked-LM loss, perplexity and accuracy of a checkpoint on any FASTA, with fixed masks."""

import json
import logging
from pathlib import Path

import datasets
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from protein_mlm.alphabet import encode_residues
from protein_mlm.data.datamodule import MaskedSequenceDataset
from protein_mlm.data.masking import collate
from protein_mlm.data.preprocess import FEATURES, residue_lengths, unigram_perplexity
from protein_mlm.data.readers import read_sequences
from protein_mlm.data.samplers import TokenBudgetBatchSampler
from protein_mlm.errors import ConfigError
from protein_mlm.inference.loading import load_model, resolve_model
from protein_mlm.model.objective import MaskedLMTotals, masked_lm

log = logging.getLogger(__name__)


def check_eval_config(cfg: DictConfig) -> None:
    if not cfg.get("ckpt_path"):
        raise ConfigError("no checkpoint given; pass ckpt_path=<file.ckpt, run dir or Hugging Face ESM directory>")
    resolve_model(cfg.ckpt_path)
    if not cfg.data.get("val_path"):
        raise ConfigError("no FASTA given; pass data.val_path=<file.fasta[.gz]>")
    if not Path(cfg.data.val_path).is_file():
        raise ConfigError(f"data.val_path={cfg.data.val_path} does not exist; pass the path of a FASTA file")
    if not any(residues for _, residues in read_sequences(Path(cfg.data.val_path))):  # stops at the first sequence
        raise ConfigError(f"data.val_path={cfg.data.val_path} holds no sequence; pass a FASTA with at least one")


def fasta_dataset(path: str | Path) -> datasets.Dataset:
    """Every non-empty record of a FASTA, in file order (no dedup: the file is evaluated as it is)."""
    ids = [encode_residues(residues) for _, residues in read_sequences(path) if residues]
    return datasets.Dataset.from_dict({"input_ids": ids}, features=FEATURES)


class MaskedLMScorer(pl.LightningModule):
    """A loaded model's masked-LM totals over a validation loader; Lightning brings the device and precision."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.totals = model, MaskedLMTotals()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.totals.update(*masked_lm(self.model, batch), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.totals.compute())


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate, write eval.json into the run dir, print one line, return the numbers."""
    check_eval_config(cfg)
    loaded = load_model(cfg.ckpt_path)
    module = MaskedLMScorer(loaded.model)

    sequences = fasta_dataset(cfg.data.val_path)
    dataset = MaskedSequenceDataset(sequences, cfg.data.max_length, cfg.data.seed, cfg.data.mask_prob)
    lengths = (residue_lengths(sequences).clip(max=cfg.data.max_length - 2) + 2).astype(int)
    # Epoch 0 and a fixed order: the same crops and masks, so the same numbers, on every call.
    sampler = TokenBudgetBatchSampler(lengths, cfg.data.max_tokens, cfg.data.seed, shuffle=False, fixed=True)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    print(f"Evaluating {loaded.description} on {cfg.data.val_path}", flush=True)
    trainer.validate(module, dataloaders=loader, verbose=False)
    results = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report = {
        "checkpoint": str(loaded.source),
        "data": str(cfg.data.val_path),
        "sequences": len(sequences),
        "loss": results["val/loss"],
        "perplexity": results["val/perplexity"],
        "accuracy": results["val/accuracy"],
        "unigram_perplexity": unigram_perplexity(sequences),
        "mask_seed": cfg.data.seed,
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(
        f"Eval: {report['sequences']} sequences, loss {report['loss']:.4f}, perplexity {report['perplexity']:.3f} "
        f"(amino-acid unigram perplexity {report['unigram_perplexity']:.3f}), accuracy {report['accuracy']:.4f}; "
        f"wrote {out / 'eval.json'}",
        flush=True,
    )
    return report
