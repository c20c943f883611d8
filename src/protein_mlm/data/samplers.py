"""Which samples each epoch serves, and in which batches: one planner, three small batching strategies.

Everything here is a pure function of (seed, epoch, rank): training's `loader.ResumableLoader` asks for an epoch's
batches by number, so the epoch never depends on a framework calling `set_epoch`. `EpochPlanner` owns what every
strategy shares: the epoch's rows (`epoch_indices`, cluster sampling), the generator keyed on (seed, epoch), the
rank split and a cache of a few epochs' plans. A strategy (`FixedSize`, `TokenBudget`, `packing.Packed`) only cuts
one epoch's rows into batches, vectorised (no Python loop per sequence), so an epoch of 60M sequences plans in
seconds. Every rank plans the whole epoch identically and keeps only its share: no cross-rank communication.
"""

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from protein_mlm.errors import ConfigError

PLANS_KEPT = 3  # the epoch still being committed, the one being read and the one prepared in the background


def rank_share(num_items: int, num_replicas: int, rank: int) -> np.ndarray:
    """Positions rank, rank + W, rank + 2W, ... of an epoch's list of `num_items`, for rank `rank` of W.

    The list is extended past its end so every rank gets the same count and DDP ranks step together; a position
    >= num_items is padding for item `position % num_items`. Training repeats those items (as `DistributedSampler`
    does); validation serves them as weightless samples (see `padding_index`), so its metrics stay exact.
    """
    return np.arange(rank, num_items + (-num_items % num_replicas), num_replicas)


def padding_index(index):
    """The index a validation sampler yields for a padding copy of `index`: the dataset gives it no targets."""
    return -1 - index


def index_dtype(count: int) -> type:
    """Sample indices as int32 while they fit: half the memory of an epoch's plan."""
    return np.int32 if count < 2**31 else np.int64


def _served(order: np.ndarray, positions: np.ndarray, weightless_padding: bool) -> np.ndarray:
    """order[positions], wrapping past the end; wrapped entries as `padding_index` when `weightless_padding`."""
    picked = order[positions % len(order)]
    if weightless_padding:
        picked = np.where(positions < len(order), picked, padding_index(picked))
    return picked


@dataclass(frozen=True)
class Batches:
    """Batches as one flat array of sample indices: batch b is indices[offsets[b]:offsets[b + 1]]."""

    indices: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, batch: int) -> np.ndarray:
        if not -len(self) <= batch < len(self):
            raise IndexError(batch)
        batch %= len(self)
        return self.indices[self.offsets[batch] : self.offsets[batch + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[b] for b in range(len(self)))

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, positions: np.ndarray, weightless_padding: bool = False) -> "Batches":
        """The batches at `positions`, wrapping past the end (padded ones weightless if asked); vectorised."""
        wrapped = positions % len(self)
        sizes = self.sizes()[wrapped]
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        # Entry j of batch k comes from indices[starts[k] + j]: one repeat and one arange, no loop over batches.
        dtype = index_dtype(max(len(self.indices), int(offsets[-1])))
        source = np.repeat((self.offsets[wrapped] - offsets[:-1]).astype(dtype), sizes)
        source += np.arange(offsets[-1], dtype=dtype)
        indices = self.indices[source]
        del source
        if weightless_padding:
            indices = np.where(np.repeat(positions >= len(self), sizes), padding_index(indices), indices)
        return Batches(indices, offsets)


def cut_every(count: int, size: int) -> np.ndarray:
    """Offsets of consecutive batches of `size` over `count` items, the last one shorter."""
    return np.append(np.arange(0, count, size), count)


class Strategy(Protocol):
    """How one epoch's rows become batches; `order_version` changes whenever the same seed would batch differently."""

    order_version: str

    def batches(self, rows: np.ndarray, rng: np.random.Generator | None) -> tuple[Batches, np.ndarray | None]:
        """The epoch's batches, and the order they are served in (None: as listed): a rank gathers only its own."""


class FixedSize:
    """`batch_size` samples a batch: the epoch's rows shuffled and cut into consecutive chunks."""

    order_version = "fixed_size/2"  # 1: a torch generator and a per-sample rank split

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def batches(self, rows: np.ndarray, rng: np.random.Generator | None) -> tuple[Batches, None]:
        order = rows if rng is None else rows[rng.permutation(len(rows))]
        return Batches(order, cut_every(len(order), self.batch_size)), None


def shuffled(count: int, rng: np.random.Generator) -> np.ndarray:
    """rng.permutation(count) (the same draws, the same result) as int32 while it fits: half the memory."""
    order = np.arange(count, dtype=index_dtype(count))
    rng.shuffle(order)
    return order


CHUNK = 1 << 20  # items per step of the chunked passes: a few MB of temporaries, cache-friendly scatters


def sort_stably_by_length(items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`items` ordered by lengths[items], equal lengths kept in order: a counting sort in chunks, in the items' own
    dtype, so no n-long int64 index array (numpy's argsort and its buffer: 16 bytes an item) ever exists."""
    keys = lengths[items]  # 2 bytes an item; read in one pass, not once per pass
    counts = np.bincount(keys, minlength=int(lengths.max(initial=0)) + 1)
    next_free = np.cumsum(counts) - counts  # where each length's run begins in the output
    out = np.empty_like(items)
    for start in range(0, len(items), CHUNK):
        chunk_keys = keys[start : start + CHUNK]
        by_key = np.argsort(chunk_keys, kind="stable")  # radix sort of 16-bit keys
        counts = np.bincount(chunk_keys, minlength=len(next_free))
        # The chunk's j-th item in key order goes to j, shifted from where its length starts in the chunk to where
        # it continues in the output: one lookup in a table of max_length entries.
        shift = next_free - (np.cumsum(counts) - counts)
        out[shift[chunk_keys[by_key]] + np.arange(len(by_key))] = items[start : start + CHUNK][by_key]
        next_free += counts
    return out


def sort_by_length(rows: np.ndarray, lengths: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """`rows` by ascending length, ties in a random order from `rng`: np.lexsort((tie_break, lengths)), in O(n).

    Visiting the rows in the tie-break's order and sorting that stably by length gives the lexsort's order.
    """
    if rng is None:
        return sort_stably_by_length(rows, lengths)
    tie_break = shuffled(len(rows), rng)
    by_tie = np.empty(len(rows), dtype=tie_break.dtype)
    for start in range(0, len(rows), CHUNK):  # by_tie[tie_break] = arange(n), without an n-long arange
        chunk = tie_break[start : start + CHUNK]
        by_tie[chunk] = np.arange(start, start + len(chunk), dtype=by_tie.dtype)
    del tie_break
    # Always gather: rows carries no promise of being an arange, and whether it is cannot be read from its values
    # (a cluster draw [0, 4, 2] starts at 0 and ends at len - 1). The gather costs no extra peak: by_tie is freed first.
    items = rows[by_tie]
    del by_tie
    return sort_stably_by_length(items, lengths)


def greedy_cuts(sorted_lengths: np.ndarray, max_tokens: int) -> np.ndarray:
    """fairseq's greedy cut of ascending lengths: a batch closes when one more would pad past `max_tokens`.

    The same cuts as a loop over every item, computed per run of equal lengths (at most max_length runs): a batch
    open when a run starts takes run items while (size + 1) x length fits, then full batches of
    max_tokens // length follow inside the run.
    """
    count = len(sorted_lengths)
    starts = np.flatnonzero(np.diff(sorted_lengths)) + 1
    run_starts, run_ends = np.append(0, starts), np.append(starts, count)
    cuts, open_start = [np.zeros(1, dtype=np.int64)], 0
    for begin, end, length in zip(run_starts, run_ends, sorted_lengths[run_starts]):
        per_batch = max_tokens // int(length)
        full_at = open_start + per_batch  # where the open batch, grown with this run's items, would be full
        if full_at <= begin:  # not even the run's first item fits the open batch
            cuts.append(np.array([begin]))
            open_start, full_at = int(begin), int(begin) + per_batch
        if full_at < end:
            inside = np.arange(full_at, end, per_batch)
            cuts.append(inside)
            open_start = int(inside[-1])
    cuts.append(np.array([count]))
    return np.concatenate(cuts)


class TokenBudget:
    """fairseq `--max-tokens` batching: batches of similar length whose padded size fits `max_tokens`.

    Each epoch sorts by length with a random tie-break, cuts greedy batches, and shuffles the batch order, so
    padding stays small and the order stays random. Without a generator (validation) the sorted order is kept.
    """

    order_version = "token_budget/1"  # the batches of the per-item loop it replaced, for the same seed

    def __init__(self, lengths: np.ndarray, max_tokens: int):
        if max_tokens < int(lengths.max()):
            raise ConfigError(
                f"data.max_tokens={max_tokens} is below the longest (cropped) sequence, {int(lengths.max())} tokens; "
                "raise data.max_tokens or lower data.max_length"
            )
        self.lengths, self.max_tokens = lengths, max_tokens

    def batches(self, rows: np.ndarray, rng: np.random.Generator | None) -> tuple[Batches, np.ndarray | None]:
        order = sort_by_length(rows, self.lengths, rng)  # ascending length: the last sets the padded width
        batches = Batches(order, greedy_cuts(self.lengths[order], self.max_tokens))
        return batches, None if rng is None else rng.permutation(len(batches))


def compact_lengths(lengths) -> np.ndarray:
    """Lengths as uint16 when they fit: 2 bytes a row instead of 8 at UniRef scale, and radix-sortable."""
    lengths = np.asarray(lengths)
    return lengths.astype(np.uint16) if len(lengths) and lengths.min() >= 0 and lengths.max() < 2**16 else lengths


class EpochPlanner:
    """This rank's batches of any epoch from `strategy`: each epoch planned at most once, from (seed, epoch) alone.

    An epoch covers every row once (or `epoch_indices(epoch)`, cluster sampling); `shuffle` draws the strategy's
    randomness from a generator keyed on (seed, epoch); the rank keeps batches rank, rank + W, ... of the shared
    list, padded to the same count on every rank (weightless copies when `fixed`, i.e. validation, which also keeps
    epoch 0). `prepare(epoch)` plans an epoch in a background thread, so the loader never waits at a boundary.
    As a batch sampler it yields lists of (epoch, index) for the epoch set by `set_epoch`.
    """

    def __init__(
        self,
        strategy: Strategy,
        num_rows: int,
        seed: int,
        shuffle: bool = True,
        fixed: bool = False,
        epoch_indices: Callable[[int], np.ndarray] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.strategy, self.num_rows, self.seed = strategy, num_rows, seed
        self.shuffle, self.fixed, self.epoch_indices = shuffle, fixed, epoch_indices
        self.num_replicas, self.rank = num_replicas, rank
        self.order_version = strategy.order_version
        self.epoch, self.plans_built = 0, Counter()  # plans built per epoch: one each, however it is read
        self._plans: dict[int, Future] = {}
        self._lock = threading.Lock()

    def rows(self, epoch: int) -> np.ndarray:
        """The dataset rows one epoch covers, before any shuffling."""
        if self.epoch_indices is None:
            return np.arange(self.num_rows, dtype=index_dtype(self.num_rows))
        return np.asarray(self.epoch_indices(epoch))

    def _planned(self, epoch: int) -> tuple[Batches, np.ndarray | None]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        return self.strategy.batches(self.rows(epoch), rng)

    def batches(self, epoch: int) -> Batches:
        """Every rank's batches of one epoch, in the order they are served (not cached)."""
        batches, order = self._planned(epoch)
        return batches if order is None else batches.take(order)

    def _build(self, epoch: int) -> Batches:
        """This rank's batches: positions rank, rank + W, ... of the served order, gathered once."""
        self.plans_built[epoch] += 1
        batches, order = self._planned(epoch)
        if order is not None and self.fixed:  # weightless padding needs the served list itself
            batches, order = batches.take(order), None
        positions = rank_share(len(batches), self.num_replicas, self.rank)
        if order is None:
            return batches if self.num_replicas == 1 else batches.take(positions, weightless_padding=self.fixed)
        return batches.take(order[positions % len(order)])

    def _claim(self, epoch: int) -> tuple[Future, bool]:
        """The epoch's plan, and whether the caller must build it (nobody has started to)."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is not None:
                return plan, False
            plan = self._plans[epoch] = Future()
            for old in sorted(self._plans)[:-PLANS_KEPT]:
                del self._plans[old]
            return plan, True

    def _fill(self, epoch: int, plan: Future) -> None:
        try:
            plan.set_result(self._build(epoch))
        except BaseException as e:  # raised again in whoever asks for the plan
            plan.set_exception(e)

    def rank_batches(self, epoch: int) -> Batches:
        """This rank's batches of one epoch, in the order they are served; planned once, then cached."""
        plan, mine = self._claim(epoch)
        if mine:
            self._fill(epoch, plan)
        return plan.result()

    plan = rank_batches

    def prepare(self, epoch: int) -> None:
        """Start planning `epoch` in a background thread unless it is planned or under way."""
        plan, mine = self._claim(epoch)
        if mine:
            threading.Thread(target=self._fill, args=(epoch, plan), daemon=True, name=f"plan-epoch-{epoch}").start()

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed:
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.rank_batches(self.epoch):
            yield [(self.epoch, int(i)) for i in batch]


class FixedSizeBatches(EpochPlanner):
    """Training batches of `batch_size` samples from a per-epoch shuffle."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, **planner):
        super().__init__(FixedSize(batch_size), num_samples, seed, **planner)


class TokenBudgetBatchSampler(EpochPlanner):
    """Token-budget batches (`TokenBudget`) as a batch sampler; `fixed=True` (validation) keeps the sorted order."""

    def __init__(self, lengths: np.ndarray, max_tokens: int, seed: int, **planner):
        self.lengths = compact_lengths(lengths)
        super().__init__(TokenBudget(self.lengths, max_tokens), len(self.lengths), seed, **planner)


class EpochSampler(Sampler):
    """Validation with `data.batch_size`: yields (epoch, index) so the dataset knows the epoch in worker processes.

    `fixed=True` keeps epoch 0 and a given order, so every evaluation sees the same masks; a rank serves samples
    rank, rank + W, ... of it, padded with weightless copies. `shuffle` permutes each epoch (a torch generator).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        order=None,
        fixed: bool = False,
        epoch_indices: Callable[[int], np.ndarray] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.num_samples, self.seed, self.shuffle, self.fixed = num_samples, seed, shuffle, fixed
        self.num_replicas, self.rank = num_replicas, rank  # DDP: this rank's share of every epoch
        self.order = np.arange(num_samples) if order is None else np.asarray(order)
        self.epoch_indices = epoch_indices
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed:
            self.epoch = epoch

    def __len__(self) -> int:
        total = self.num_samples if self.epoch_indices is None else len(self.epoch_indices(self.epoch))
        return len(rank_share(total, self.num_replicas, self.rank))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of one epoch, in the order they are served."""
        order = self.order if self.epoch_indices is None else np.asarray(self.epoch_indices(epoch))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = order[torch.randperm(len(order), generator=generator).numpy()]
        if self.num_replicas > 1:
            order = _served(order, rank_share(len(order), self.num_replicas, self.rank), self.fixed)
        return order

    def __iter__(self):
        for index in self.epoch_order(self.epoch):
            yield self.epoch, int(index)
