"""Which samples each epoch serves, and in which batches: per-epoch shuffles, fairseq-style token-budget batches.

Everything here is a pure function of (seed, epoch, rank): training's `loader.ResumableLoader` asks for an epoch's
batches by number, so the epoch never depends on a framework calling `set_epoch`.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Sampler

from protein_mlm.errors import ConfigError


def rank_share(num_items: int, num_replicas: int, rank: int) -> np.ndarray:
    """Positions rank, rank + W, rank + 2W, ... of an epoch's list of `num_items`, for rank `rank` of W.

    The list is extended past its end so every rank gets the same count and DDP ranks step together; a position
    >= num_items is padding for item `position % num_items`. Training repeats those items (as `DistributedSampler`
    does); validation serves them as weightless samples (see `padding_index`), so its metrics stay exact.
    """
    return np.arange(rank, num_items + (-num_items % num_replicas), num_replicas)


def padding_index(index: int) -> int:
    """The index a validation sampler yields for a padding copy of `index`: the dataset gives it no targets."""
    return -1 - index


def _served(order: np.ndarray, positions: np.ndarray, weightless_padding: bool) -> np.ndarray:
    """order[positions], wrapping past the end; wrapped entries as `padding_index` when `weightless_padding`."""
    picked = order[positions % len(order)]
    if weightless_padding:
        picked = np.where(positions < len(order), picked, padding_index(picked))
    return picked


class EpochSampler(Sampler):
    """Yields (epoch, index) so the dataset knows the epoch even inside worker processes.

    Training: a fresh permutation per epoch from (seed, epoch) (`epoch_order`, cut into batches by `FixedSizeBatches`).
    Validation: `fixed=True` keeps epoch 0 and a given order, so every evaluation sees the same masks.
    `epoch_indices(epoch)`, when given, picks the rows an epoch covers (cluster sampling); they are then shuffled.
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


class FixedSizeBatches:
    """Training batches of `batch_size` samples: an `EpochSampler`'s epoch order cut into consecutive chunks."""

    def __init__(self, sampler: EpochSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of one epoch, in the order they are served."""
        if self._cache is None or self._cache[0] != epoch:
            order = self.sampler.epoch_order(epoch)
            self._cache = (epoch, [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)])
        return self._cache[1]


class TokenBudgetBatchSampler(Sampler):
    """fairseq `--max-tokens` batching: batches of similar length whose padded size fits `max_tokens`.

    Each epoch sorts by length with a random tie-break from (seed, epoch), cuts greedy batches, and shuffles
    the batch order, so padding stays small and the order stays random. Yields lists of (epoch, index).
    `fixed=True` (validation) keeps epoch 0 and the sorted order. `epoch_indices(epoch)`, when given, picks the
    rows an epoch batches (cluster sampling); without it every row is batched once per epoch.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        max_tokens: int,
        seed: int,
        shuffle: bool = True,
        fixed: bool = False,
        epoch_indices: Callable[[int], np.ndarray] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if max_tokens < int(lengths.max()):
            raise ConfigError(
                f"data.max_tokens={max_tokens} is below the longest (cropped) sequence, {int(lengths.max())} tokens; "
                "raise data.max_tokens or lower data.max_length"
            )
        self.lengths, self.max_tokens, self.seed = np.asarray(lengths), max_tokens, seed
        self.shuffle, self.fixed, self.epoch = shuffle, fixed, 0
        self.epoch_indices = epoch_indices
        self.num_replicas, self.rank = num_replicas, rank  # DDP: this rank serves batches rank, rank + W, ...
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed:
            self.epoch = epoch

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The batches (arrays of sample indices) of one epoch, in the order they are served."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rows = np.arange(len(self.lengths)) if self.epoch_indices is None else np.asarray(self.epoch_indices(epoch))
        rng = np.random.default_rng([self.seed, epoch])
        tie_break = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
        order = rows[np.lexsort((tie_break, self.lengths[rows]))]  # ascending length: the last sets the padded width
        batches, start = [], 0
        for end in range(1, len(order) + 1):
            if end == len(order) or (end - start + 1) * self.lengths[order[end]] > self.max_tokens:
                batches.append(order[start:end])
                start = end
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of one epoch: every W-th of the shared list, padded to the same count per rank."""
        batches = self.batches(epoch)
        if self.num_replicas == 1:
            return batches
        positions = rank_share(len(batches), self.num_replicas, self.rank)
        wrapped = [batches[p % len(batches)] for p in positions]
        if self.fixed:  # validation: padding batches carry no targets
            wrapped = [b if p < len(batches) else padding_index(b) for p, b in zip(positions, wrapped)]
        return wrapped

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))

    def __iter__(self):
        for batch in self.rank_batches(self.epoch):
            yield [(self.epoch, int(i)) for i in batch]
