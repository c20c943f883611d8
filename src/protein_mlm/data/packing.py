"""Packed training batches: whole sequences laid end to end in `rows` rows of `row_tokens`, one fixed shape.

No padding inside a row's sequences, so no FLOPs spent on pads, and one token shape for the whole run (what
`torch.compile` wants). Attention never crosses a sequence boundary: each sequence is a segment of `cu_seqlens`
(varlen flash attention on CUDA; a block-diagonal mask elsewhere, see model/attention.py; the packed forward
is model/packed.py); positions restart at every
sequence; ESM's token dropout is computed per sequence, not per row. A row's unused tail is one segment of padding
without targets.

`cu_seqlens` holds the batch's real segments only, rounded up to a bucket of `SEGMENT_BUCKET` with empty ones: flash
kernels launch blocks for every segment, forward and backward, so a fixed worst-case length (a third of the tokens)
cost 8x in attention on an H200. Its length is marked dynamic for `torch.compile`, so varying counts share one graph.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from protein_mlm.data.masking import COUNTS_KEY, IGNORE_INDEX, BatchCounts
from protein_mlm.data.samplers import rank_share
from protein_mlm.data.tokenizer import PAD_ID
from protein_mlm.errors import ConfigError

SEGMENT_BUCKET = 64  # cu_seqlens grows in steps of this many segments: few distinct shapes, at most 63 empty ones
MAX_SEGMENTS = 65_535  # flash attention launches a grid dimension per segment; CUDA caps it at 65,535


def max_sequences_per_batch(rows: int) -> int:
    """Sequences one packed batch may hold so that they, the rows' tails and the bucket stay under MAX_SEGMENTS."""
    return MAX_SEGMENTS - rows - (SEGMENT_BUCKET - 1)


def check_packing_options(packing: bool, max_tokens, streaming: bool, max_length: int | None = None) -> None:
    """data.packing=true lays whole sequences into rows of data.max_length tokens, max_tokens of them per batch."""
    if packing and max_tokens is not None and max_length and max_sequences_per_batch(max_tokens // max_length) < 1:
        raise ConfigError(
            f"data.packing=true: {max_tokens // max_length:,} rows of data.max_length per batch leave no room under "
            f"flash attention's {MAX_SEGMENTS:,} segments; lower data.max_tokens or raise data.max_length"
        )
    if packing and max_tokens is None:
        raise ConfigError(
            "data.packing=true needs data.max_tokens (tokens per packed batch); e.g. data.max_tokens=4096"
        )
    if packing and streaming:
        raise ConfigError("data.packing=true needs every length up front; set data.streaming=false")


def best_fit_rows(lengths: Sequence[int], rows: int, row_tokens: int, max_items: int | None = None) -> list[list[int]]:
    """Positions of `lengths` placed in `rows` rows of `row_tokens`: longest first, each into the fullest row it
    fits (best fit decreasing), at most `max_items` of them; a position that fits no row is left out. Deterministic
    (a stable sort), and placing a subset of what it placed gives the same rows, so collate can rebuild a batch's
    rows from its lengths alone."""
    room, placed = [row_tokens] * rows, [[] for _ in range(rows)]
    budget = len(lengths) if max_items is None else max_items
    for position in sorted(range(len(lengths)), key=lambda p: -lengths[p]):
        if budget == 0:
            break
        fits = [r for r in range(rows) if room[r] >= lengths[position]]
        if fits:
            row = min(fits, key=lambda r: room[r])
            placed[row].append(position)
            room[row] -= lengths[position]
            budget -= 1
    return placed


class PackedBatches:
    """An epoch's batches of `rows` x `row_tokens` packed tokens, for `loader.ResumableLoader`.

    Per epoch: a fresh permutation from (seed, epoch); a window of the next `window` sequences in that order is
    packed by `best_fit_rows`, the placed ones form a batch (in window order) and the rest wait for the next. So the
    order stays random up to the window, and rows come out nearly full.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        rows: int,
        row_tokens: int,
        seed: int,
        epoch_indices: Callable[[int], np.ndarray] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        window: int | None = None,
    ):
        self.lengths, self.rows, self.row_tokens, self.seed = np.asarray(lengths), rows, row_tokens, seed
        self.epoch_indices, self.num_replicas, self.rank = epoch_indices, num_replicas, rank
        self.window = window or 16 * rows  # candidates per batch: fuller rows, a little less randomness
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Every batch of one epoch (all ranks), as sample indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        indices = np.arange(len(self.lengths)) if self.epoch_indices is None else np.asarray(self.epoch_indices(epoch))
        order = indices[np.random.default_rng([self.seed, epoch]).permutation(len(indices))].tolist()
        batches, waiting, next_item = [], [], 0
        while waiting or next_item < len(order):
            take = self.window - len(waiting)
            waiting += order[next_item : next_item + take]
            next_item += take
            rows = best_fit_rows(
                self.lengths[waiting].tolist(), self.rows, self.row_tokens, max_sequences_per_batch(self.rows)
            )
            chosen = {p for row in rows for p in row}
            batches.append(np.array([waiting[p] for p in sorted(chosen)]))
            waiting = [item for p, item in enumerate(waiting) if p not in chosen]
        self._cache = (epoch, batches)
        return batches

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches: every W-th, padded to the same count per rank so DDP ranks step together."""
        batches = self.batches(epoch)
        positions = rank_share(len(batches), self.num_replicas, self.rank)
        return [batches[p % len(batches)] for p in positions]


def collate_packed(examples: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, row_tokens: int) -> dict[str, Any]:
    """Lay (input_ids, labels) pairs into `rows` x `row_tokens`, with positions, segment ids and `cu_seqlens`."""
    input_ids = torch.full((rows, row_tokens), PAD_ID, dtype=torch.long)
    labels = torch.full((rows, row_tokens), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, row_tokens), dtype=torch.long)
    segment_ids = torch.zeros((rows, row_tokens), dtype=torch.long)
    lengths = [len(ids) for ids, _ in examples]
    packed = best_fit_rows(lengths, rows, row_tokens)
    if sum(map(len, packed)) < len(examples):
        raise ValueError(f"{len(examples)} sequences do not fit {rows} rows of {row_tokens} tokens")
    segment_lengths: list[int] = []
    for row, members in enumerate(packed):
        start = 0
        for position in members:
            ids, lab = examples[position]
            end = start + len(ids)
            input_ids[row, start:end] = torch.from_numpy(ids)
            labels[row, start:end] = torch.from_numpy(lab)
            position_ids[row, start:end] = torch.arange(len(ids))
            segment_ids[row, start:end] = len(segment_lengths)
            segment_lengths.append(len(ids))
            start = end
        if start < row_tokens:  # the row's tail: one segment of padding, no targets
            segment_ids[row, start:] = len(segment_lengths)
            segment_lengths.append(row_tokens - start)
    # The real segments, then empty ones up to the bucket: few shapes for compiled code, little work for the kernel.
    capacity = -(-len(segment_lengths) // SEGMENT_BUCKET) * SEGMENT_BUCKET
    if capacity > MAX_SEGMENTS:
        raise ValueError(f"{len(segment_lengths):,} segments exceed flash attention's {MAX_SEGMENTS:,}")
    cu_seqlens = torch.full((capacity + 1,), rows * row_tokens, dtype=torch.int32)
    cu_seqlens[0] = 0
    cu_seqlens[1 : len(segment_lengths) + 1] = torch.tensor(segment_lengths).cumsum(0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "cu_seqlens": cu_seqlens,
        # A bound on every segment, row tails included (flash never writes past it). The row length is one constant:
        # no recompiles, and blocks past a segment's end exit at once.
        "max_seqlen": row_tokens,
        COUNTS_KEY: BatchCounts(sum(lengths), input_ids.numel(), sum(n * n for n in lengths)),
    }
