"""Packed training batches: whole sequences laid end to end in `rows` rows of `row_tokens`, one fixed shape.

No padding inside a row's sequences, so no FLOPs spent on pads, and one token shape for the whole run (what
`torch.compile` wants). Attention never crosses a sequence boundary: each sequence is a segment of `cu_seqlens`
(varlen flash attention on CUDA; a block-diagonal mask elsewhere, see model/attention.py; the packed forward
is model/packed.py); positions restart at every
sequence; ESM's token dropout is computed per sequence, not per row. A row's unused tail is one segment of padding
without targets. An epoch's rows come from best fit decreasing over its whole length histogram (`Packed`), so
planning costs about a microsecond per sequence and rows come out nearly full.

`cu_seqlens` holds the batch's real segments only, rounded up to a bucket of `SEGMENT_BUCKET` with empty ones: flash
kernels launch blocks for every segment, forward and backward, so a fixed worst-case length (a third of the tokens)
cost 8x in attention on an H200. Its length is marked dynamic for `torch.compile`, so varying counts share one graph.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from protein_mlm.alphabet import PAD_ID
from protein_mlm.data.masking import COUNTS_KEY, IGNORE_INDEX, BatchCounts
from protein_mlm.data.samplers import (
    CHUNK,
    Batches,
    EpochPlanner,
    compact_lengths,
    cut_every,
    index_dtype,
    shuffled,
    sort_stably_by_length,
)
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


def next_fit_rows(lengths: Sequence[int], rows: int, row_tokens: int) -> list[list[int]] | None:
    """Positions of `lengths` laid in order: each into the current row, or the next one when it does not fit there;
    None when `rows` rows are not enough. A `Packed` batch lists its rows one after another, so this rebuilds them
    (a list of groups that each fit a row never needs more rows than groups)."""
    placed, row, room = [[] for _ in range(rows)], 0, row_tokens
    for position, length in enumerate(lengths):
        if length > room:
            row, room = row + 1, row_tokens
            if row == rows or length > room:
                return None
        placed[row].append(position)
        room -= length
    return placed


@dataclass
class _PackTypes:
    """Best fit decreasing over an epoch's length histogram: rows as a tree of pack types, each with a count.

    Node k is a pack type: the lengths on its path from a root (longest first), held by `count[k]` rows. Adding a
    length to some of a node's rows makes a child node, so the work is per distinct length and pack type, never per
    sequence: a few thousand steps for any epoch size.
    """

    parent: list[int] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)  # sequences in the node's rows

    def add(self, parent: int, length: int, count: int) -> int:
        self.parent.append(parent)
        self.length.append(length)
        self.count.append(count)
        self.depth.append(1 if parent < 0 else self.depth[parent] + 1)
        return len(self.parent) - 1


def pack_histogram(histogram: np.ndarray, row_tokens: int, max_items: int) -> _PackTypes:
    """Rows for `histogram[length]` sequences of each length: longest first, each into the row with the least room
    that still fits it (best fit decreasing), at most `max_items` sequences a row.

    Rows of one pack type are alike, so a length is placed into many of them at once: best fit fills one row (its
    room only shrinks, so it stays the best fit) before it moves to the next row of that type.
    """
    types = _PackTypes()
    open_at: list[list[int]] = [[] for _ in range(row_tokens + 1)]  # room -> open pack types with that room
    rooms = np.zeros(row_tokens + 1, dtype=np.int64)  # open pack types per room, to find the best fit in one call

    def settle(node: int, room: int) -> None:  # open a pack type whose rows another sequence could join
        if types.depth[node] < max_items and room > 0:
            open_at[room].append(node)
            rooms[room] += 1

    for length in np.flatnonzero(histogram)[::-1].tolist():
        waiting = int(histogram[length])
        while waiting:
            fits = np.flatnonzero(rooms[length:])
            if len(fits):
                room = length + int(fits[0])
                parent = open_at[room][-1]
                available, depth = types.count[parent], types.depth[parent]
            else:  # no open row fits: new rows
                room, parent, available, depth = row_tokens, -1, waiting, 0
            per_row = min(room // length, max_items - depth)
            full = min(waiting // per_row, available)
            rest = waiting - full * per_row if full < available else 0  # one more row takes the rest
            used = full + (rest > 0)
            if parent >= 0:
                types.count[parent] -= used
                if not types.count[parent]:
                    open_at[room].remove(parent)
                    rooms[room] -= 1
            chain = []
            for _ in range(per_row if full else rest):
                chain.append(types.add(parent if not chain else chain[-1], length, 0))
            types.count[chain[-1]] += full
            if rest:
                types.count[chain[rest - 1]] += 1
            for placed in sorted({len(chain)} if not rest else {len(chain), rest}, reverse=True):
                settle(chain[placed - 1], room - placed * length)
            waiting -= full * per_row + rest
    return types


def _preorder(types: _PackTypes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nodes in depth-first order, first row of each node's subtree, end of it): a subtree's rows are contiguous."""
    children: list[list[int]] = [[] for _ in types.parent]
    roots = []
    for node, parent in enumerate(types.parent):
        (roots if parent < 0 else children[parent]).append(node)
    order, first, end = [], np.zeros(len(types.parent), np.int64), np.zeros(len(types.parent), np.int64)
    stack, row = [(node, False) for node in reversed(roots)], 0
    while stack:
        node, done = stack.pop()
        if done:
            end[node] = row
            continue
        order.append(node)
        first[node], row = row, row + types.count[node]
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(children[node]))
    return np.array(order, dtype=np.int64), first, end


def pack_rows(sequences: np.ndarray, lengths: np.ndarray, row_tokens: int, max_items: int) -> Batches:
    """`sequences` (rows of `lengths`) as packed rows of at most `row_tokens` tokens, longest first in each row.

    Sequences of one length take that length's places in the rows in the order given (random, from the caller).
    """
    histogram = np.zeros(row_tokens + 1, dtype=np.int64)
    for start in range(0, len(sequences), CHUNK):
        histogram += np.bincount(lengths[sequences[start : start + CHUNK]], minlength=row_tokens + 1)
    types = pack_histogram(histogram, row_tokens, max_items)
    order, first, end = _preorder(types)
    count, depth, length = (np.array(a, dtype=np.int64) for a in (types.count, types.depth, types.length))
    row_offsets = np.zeros(int(count.sum()) + 1, dtype=np.int64)
    np.cumsum(np.repeat(depth[order], count[order]), out=row_offsets[1:])
    # Node k's length sits at place depth[k] - 1 of every row of its subtree (rows first[k] to end[k]). Nodes by
    # length match the sequences sorted by length: each sequence gets the next such place, all with one repeat.
    edges = np.lexsort((np.arange(len(length)), length))
    sizes = end[edges] - first[edges]
    dtype = index_dtype(len(sequences) + 1)
    row_of = np.repeat((first[edges] - np.append(0, np.cumsum(sizes)[:-1])).astype(dtype), sizes)
    row_of += np.arange(len(sequences), dtype=dtype)
    places = row_offsets.astype(dtype)[row_of]
    del row_of
    places += np.repeat((depth[edges] - 1).astype(dtype), sizes)
    packed = np.empty(len(sequences), dtype=sequences.dtype)
    packed[places] = sort_stably_by_length(sequences, lengths)
    return Batches(packed, row_offsets)


def group_rows(items_per_row: np.ndarray, rows: int, max_items: int) -> np.ndarray:
    """Offsets (in rows) of batches of `rows` consecutive rows, cut early where a batch would pass `max_items`."""
    offsets = cut_every(len(items_per_row), rows)
    totals = np.add.reduceat(items_per_row, offsets[:-1]) if len(items_per_row) else items_per_row
    if (totals <= max_items).all():
        return offsets
    ends, start, cumulative = [0], 0, np.append(0, np.cumsum(items_per_row))
    while start < len(items_per_row):  # only with tiny sequences and huge batches: one step per batch
        start = min(start + rows, int(np.searchsorted(cumulative, cumulative[start] + max_items, "right")) - 1)
        ends.append(start)
    return np.array(ends)


class Packed:
    """Whole sequences laid end to end in `rows` rows of `row_tokens`, one fixed shape for every batch.

    Per epoch: the rows are shuffled, packed into rows by best fit decreasing over the whole epoch's lengths (ties
    in the shuffled order), and the rows shuffled again and taken `rows` at a time (fewer where the batch would pass
    `max_sequences_per_batch`). A batch lists its rows one after another, longest sequence first in each, so
    `collate_packed(..., in_order=True)` rebuilds them with `next_fit_rows`.
    """

    order_version = "packed/2"  # 1: best fit over a sliding window of 16 x rows sequences, rebuilt by best fit

    def __init__(self, lengths: np.ndarray, rows: int, row_tokens: int):
        if len(lengths) and int(lengths.max()) > row_tokens:
            raise ConfigError(f"a sequence of {int(lengths.max())} tokens does not fit a row of {row_tokens}")
        self.lengths, self.rows, self.row_tokens = lengths, rows, row_tokens

    def batches(self, rows: np.ndarray, rng: np.random.Generator | None) -> tuple[Batches, None]:
        order = rows if rng is None else rows[shuffled(len(rows), rng)]
        max_items = max_sequences_per_batch(self.rows)
        packed = pack_rows(order, self.lengths, self.row_tokens, max_items)
        del order
        if rng is not None:
            packed = packed.take(shuffled(len(packed), rng))
        batch_rows = group_rows(packed.sizes(), self.rows, max_items)
        return Batches(packed.indices, packed.offsets[batch_rows]), None


class PackedBatches(EpochPlanner):
    """Packed batches (`Packed`) of `rows` x `row_tokens` tokens, for `loader.ResumableLoader`."""

    def __init__(self, lengths: np.ndarray, rows: int, row_tokens: int, seed: int, **planner):
        self.lengths = compact_lengths(lengths)
        super().__init__(Packed(self.lengths, rows, row_tokens), len(self.lengths), seed, **planner)


def collate_packed(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, row_tokens: int, in_order: bool = False
) -> dict[str, Any]:
    """Lay (input_ids, labels) pairs into `rows` x `row_tokens`, with positions, segment ids and `cu_seqlens`:
    by `best_fit_rows`, or with `in_order` row after row as given (`next_fit_rows`, what a `Packed` batch needs)."""
    input_ids = torch.full((rows, row_tokens), PAD_ID, dtype=torch.long)
    labels = torch.full((rows, row_tokens), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, row_tokens), dtype=torch.long)
    segment_ids = torch.zeros((rows, row_tokens), dtype=torch.long)
    lengths = [len(ids) for ids, _ in examples]
    packed = next_fit_rows(lengths, rows, row_tokens) if in_order else best_fit_rows(lengths, rows, row_tokens)
    if packed is None or sum(map(len, packed)) < len(examples):
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
