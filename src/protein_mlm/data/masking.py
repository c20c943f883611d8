"""ESM/fairseq-style masked-LM corruption of one sequence, plus the padding collator.

Randomness comes from a generator keyed on (seed, epoch, sample index), so a sample's crop and mask are
the same whatever the worker count, batch composition or process, and can be recomputed after a resume.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from protein_mlm.alphabet import CLS_ID, EOS_ID, IGNORE_INDEX, MASK_ID, PAD_ID, STANDARD_AMINO_ACID_IDS


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Independent generator for one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index])


def crop(residues: np.ndarray, max_residues: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `max_residues` from a longer sequence (ESM-2 crops, rather than truncates)."""
    if len(residues) <= max_residues:
        return residues
    start = rng.integers(0, len(residues) - max_residues + 1)
    return residues[start : start + max_residues]


def mask_tokens(
    residues: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Add <cls>/<eos>, choose `mask_prob` of the residues, corrupt them 80/10/10; return (input_ids, labels).

    As fairseq's MaskTokensDataset: the number of targets is `mask_prob * n` rounded at random (so the
    expected rate is exact even for short sequences); of those, 80% become <mask>, 10% a random standard amino
    acid (never a special token) and 10% stay unchanged. <cls>, <eos> and padding are never targets.
    """
    n = len(residues)
    input_ids = np.empty(n + 2, dtype=np.int64)
    input_ids[0], input_ids[-1] = CLS_ID, EOS_ID
    input_ids[1:-1] = residues
    labels = np.full(n + 2, IGNORE_INDEX, dtype=np.int64)

    num_targets = int(mask_prob * n + rng.random())
    targets = 1 + rng.choice(n, size=num_targets, replace=False)
    labels[targets] = input_ids[targets]

    action = rng.random(num_targets)
    to_mask = targets[action < mask_token_prob]
    to_random = targets[(action >= mask_token_prob) & (action < mask_token_prob + random_token_prob)]
    input_ids[to_mask] = MASK_ID
    input_ids[to_random] = rng.choice(STANDARD_AMINO_ACID_IDS, size=len(to_random))
    return input_ids, labels


COUNTS_KEY = "counts"  # a batch's BatchCounts


class BatchCounts(NamedTuple):
    """Host-side sizes of a batch, for throughput and MFU."""

    tokens: int  # real (non-pad) tokens
    padded: int  # tokens including padding
    squared_lengths: int  # sum of sequence lengths squared (attention FLOPs grow with it)


def collate(examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Pad (input_ids, labels) pairs to the longest in the batch; count its tokens on the host."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.from_numpy(ids)
        labels[row, : len(lab)] = torch.from_numpy(lab)
    lengths = [len(ids) for ids, _ in examples]
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(PAD_ID).long(),
        "labels": labels,
        # Counted here, as Python ints, so the training step never reads them back from a GPU (a host sync).
        COUNTS_KEY: BatchCounts(sum(lengths), input_ids.numel(), sum(n * n for n in lengths)),
    }
