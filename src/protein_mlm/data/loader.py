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

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from protein_mlm.errors import ConfigError

STATE_FORMAT = 1
POSITION_KEY = "data_position"  # (epoch, batch index in that epoch), added to every training batch


class Batcher(Protocol):
    """A batch sampler that can name any epoch's batches for this rank (samplers.TokenBudgetBatchSampler, ...)."""

    def rank_batches(self, epoch: int) -> list[np.ndarray]: ...


class _EpochSlice(Sampler):
    """The batch sampler the DataLoader iterates: `batches` of `epoch`, as lists of (epoch, index) keys."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, int(i)) for i in batch]


class ResumableLoader:
    """Batches of epoch 0, 1, 2, ... from `batcher`, resumable at any committed (epoch, batch)."""

    def __init__(self, dataset: Dataset, batcher: Batcher, collate_fn: Callable, num_workers: int, pin_memory: bool):
        self.batcher = batcher
        self.epoch, self.batch = 0, 0  # the next batch to train on
        self._slice = _EpochSlice()
        # One DataLoader for the whole run: with persistent workers they survive the epoch boundaries.
        self._dataloader = DataLoader(
            dataset,
            batch_sampler=self._slice,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.epoch, self.batch
        while True:
            self._slice.epoch, self._slice.batches = epoch, self.batcher.rank_batches(epoch)[start:]
            for offset, batch in enumerate(self._dataloader):
                batch[POSITION_KEY] = (epoch, start + offset)
                yield batch
            epoch, start = epoch + 1, 0

    def commit(self, position: tuple[int, int]) -> None:
        """An update has used the batch at `position`: the next one is where a resume continues."""
        epoch, batch = position
        if batch + 1 >= len(self.batcher.rank_batches(epoch)):
            self.epoch, self.batch = epoch + 1, 0
        else:
            self.epoch, self.batch = epoch, batch + 1

    def state_dict(self) -> dict[str, int]:
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "batch": self.batch,
            "batches_in_epoch": len(self.batcher.rank_batches(self.epoch)),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(
                f"the checkpoint's data position has format {state.get('format')}; expected {STATE_FORMAT}"
            )
        now = len(self.batcher.rank_batches(state["epoch"]))
        if now != state["batches_in_epoch"]:
            raise ConfigError(
                f"the checkpoint's epoch {state['epoch']} had {state['batches_in_epoch']} batches per rank, this run "
                f"makes {now}: the data, data.max_tokens/batch_size/max_length or the device count changed; resume "
                "with the settings the run started with"
            )
        self.epoch, self.batch = state["epoch"], state["batch"]
