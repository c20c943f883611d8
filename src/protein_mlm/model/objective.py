"""ESM's masked-LM objective on one batch, padded or packed: the summed token loss, the target count and the
correct predictions, and their token-weighted totals over a validation set. Training (training/module.py) and
evaluation (inference/evaluate.py) both score with these, so their numbers cannot drift apart."""

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from protein_mlm.alphabet import IGNORE_INDEX
from protein_mlm.model.packed import packed_logits


def batch_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """`EsmForMaskedLM` logits (B, T, vocab) of a padded batch, or of a packed one (data/packing.py)."""
    if "cu_seqlens" in batch:
        return packed_logits(model, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def masked_lm(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed loss over the masked positions, their count, and the logits."""
    logits = batch_logits(model, batch)
    labels = batch["labels"]
    # Every position with ignore_index, no boolean-mask indexing (a host sync on a GPU); the cross-entropy runs in
    # fp32 even under bf16 autocast, since it is a sum over many small terms.
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, labels.ne(IGNORE_INDEX).sum(), logits


class MaskedLMTotals(torch.nn.Module):
    """Token-weighted loss, perplexity and accuracy over many batches (not a mean of per-batch means), summed
    over DDP ranks by torchmetrics."""

    def __init__(self):
        super().__init__()
        self.loss_sum, self.targets, self.correct = SumMetric(), SumMetric(), SumMetric()

    def reset(self) -> None:
        for metric in (self.loss_sum, self.targets, self.correct):
            metric.reset()

    def update(self, loss_sum: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        self.loss_sum.update(loss_sum)
        self.targets.update(targets)
        self.correct.update((logits.argmax(-1).eq(labels) & labels.ne(IGNORE_INDEX)).sum())

    def compute(self) -> dict[str, torch.Tensor]:
        targets = self.targets.compute().clamp(min=1)
        loss = self.loss_sum.compute() / targets
        return {"val/loss": loss, "val/perplexity": torch.exp(loss), "val/accuracy": self.correct.compute() / targets}
