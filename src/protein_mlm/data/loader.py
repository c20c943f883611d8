"""The training loader: one endless stream of batches over numbered epochs, whose position is its own state.

Lightning calls `set_epoch` only on `dataloader.sampler` / `dataloader.batch_sampler.sampler` and fixes an epoch's
length from `len()` at set-up, so a custom batch sampler replays epoch 0 and an epoch whose batch count varies
(cluster sampling) is cut. Like fairseq's `EpochBatchIterator`, this loader owns the epoch instead: it asks its
batcher for epoch e's batches by number, rolls over to e + 1 by itself, and saves (epoch, next batch) in every
checkpoint through the `state_dict` / `load_state_dict` pair that Lightning saves and restores for a loader.

The position only moves when an optimizer update has used a batch (`commit`, called by the module), never when a
batch is merely fetched: prefetching and worker processes run ahead, and a checkpoint taken inside an
accumulation window must point at the window's start. Having no `len()` makes the stream one endless Lightning
epoch, so every accumulation window is full and `val_check_interval` counts whole updates.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from protein_mlm.errors import ConfigError

# 2: the state names its batch order (`order`, e.g. "packed/2"); a format-1 state had each strategy's order 1.
STATE_FORMAT = 2
POSITION_KEY = "data_position"  # (epoch, batch index in that epoch), added to every training batch


class Batcher(Protocol):
    """Any epoch's batches for this rank, planned once per epoch (samplers.EpochPlanner)."""

    order_version: str

    def rank_batches(self, epoch: int) -> Sequence[np.ndarray]: ...

    def prepare(self, epoch: int) -> None: ...


class _Stream(Sampler):
    """The batch sampler the DataLoader iterates: every batch from `start` on, epoch after epoch, as (epoch, index)
    keys. One endless pass, so worker prefetching runs across epoch boundaries; entering an epoch records its batch
    count (what `commit` needs) and starts planning the next one in the background."""

    def __init__(self, batcher: Batcher, counts: dict[int, int]):
        self.batcher, self.counts, self.start = batcher, counts, (0, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.start
        while True:
            batches = self.batcher.rank_batches(epoch)
            self.counts[epoch] = len(batches)
            self.batcher.prepare(epoch + 1)
            for index in range(first, len(batches)):
                yield [(epoch, int(i)) for i in batches[index]]
            epoch, first = epoch + 1, 0


class ResumableLoader:
    """Batches of epoch 0, 1, 2, ... from `batcher`, resumable at any committed (epoch, batch)."""

    def __init__(self, dataset: Dataset, batcher: Batcher, collate_fn: Callable, num_workers: int, pin_memory: bool):
        self.batcher = batcher
        self.epoch, self.batch = 0, 0  # the next batch to train on
        self._counts: dict[int, int] = {}  # batches per epoch, as the stream met them
        self._stream = _Stream(batcher, self._counts)
        # One DataLoader for the whole run: with persistent workers they survive the epoch boundaries.
        self._dataloader = DataLoader(
            dataset,
            batch_sampler=self._stream,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._stream.start = (self.epoch, self.batch)
        for batch, position in zip(self._dataloader, self._positions(self.epoch, self.batch)):
            batch[POSITION_KEY] = position
            yield batch

    def _positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch) of each batch the DataLoader yields, in order (the stream has counted the epoch by then)."""
        while True:
            for index in range(batch, self._batches_in(epoch)):
                yield epoch, index
            epoch, batch = epoch + 1, 0

    def _batches_in(self, epoch: int) -> int:
        """Batches in `epoch` for this rank: known once the stream entered it, else from the (cached) plan."""
        if epoch not in self._counts:
            self._counts[epoch] = len(self.batcher.rank_batches(epoch))
        return self._counts[epoch]

    def commit(self, position: tuple[int, int]) -> None:
        """An update has used the batch at `position`: the next one is where a resume continues. O(1)."""
        epoch, batch = position
        if batch + 1 >= self._batches_in(epoch):
            self.epoch, self.batch = epoch + 1, 0
        else:
            self.epoch, self.batch = epoch, batch + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "batch": self.batch,
            "batches_in_epoch": self._batches_in(self.epoch),
            "order": self.batcher.order_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") not in (1, STATE_FORMAT):
            raise ConfigError(
                f"the checkpoint's data position has format {state.get('format')}; expected {STATE_FORMAT}"
            )
        ours = self.batcher.order_version
        theirs = state.get("order", ours.split("/")[0] + "/1")  # format 1: every strategy's first order
        if theirs != ours:
            raise ConfigError(
                f"the checkpoint's batches were planned as {theirs}, this version plans {ours}: resuming would serve "
                "a different data order; finish the run with the version that started it, or start a new run"
            )
        now = self._batches_in(state["epoch"])
        if now != state["batches_in_epoch"]:
            raise ConfigError(
                f"the checkpoint's epoch {state['epoch']} had {state['batches_in_epoch']} batches per rank, this run "
                f"makes {now}: the data, data.max_tokens/batch_size/max_length or the device count changed; resume "
                "with the settings the run started with"
            )
        self.epoch, self.batch = state["epoch"], state["batch"]
