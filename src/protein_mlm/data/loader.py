"""The training loader: one endless stream of batches over numbered epochs, whose position is its own state.

Lightning calls `set_epoch` only on `dataloader.sampler` / `dataloader.batch_sampler.sampler` and fixes an epoch's
length from `len()` at set-up, so a custom batch sampler replays epoch 0 and an epoch whose batch count varies
(cluster sampling) is cut. Like fairseq's `EpochBatchIterator`, this loader owns the epoch instead: it asks its
batcher for epoch e's batches by number, rolls over to e + 1 by itself, and saves (epoch, next batch) in every
checkpoint through the `state_dict` / `load_state_dict` pair that Lightning saves and restores for a loader.
`StreamLoader` does the same for a streamed FASTA / Parquet run; both save one position (`DataPosition`), and
docs/reliability.md says which machine changes each continues exactly and which it refuses.

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

# 3: the state also names the machine it was read on (world size, DataLoader workers, readers) and its kind
# ("map" or "stream"); 2: it names its batch order (`order`, e.g. "packed/2"); 1: each strategy's order 1.
STATE_FORMAT = 3
POSITION_KEY = "data_position"  # (epoch, batch index in that epoch), added to every training batch
STREAM_ORDER = "stream/1"  # a streamed run's order: readers x shard parts (streaming.py), shuffled per reader


class Batcher(Protocol):
    """Any epoch's batches for this rank, planned once per epoch (samplers.EpochPlanner)."""

    order_version: str
    num_replicas: int  # the world size the epoch is dealt over

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


def check_machine(state: dict[str, Any], world_size: int, num_workers: int, stream: bool) -> None:
    """Refuse, in one line naming what to pass, a resume whose saved position would mean other records here.

    A map-style position is (epoch, batch) of the rank's plan: any worker count serves the same batches, another
    world size deals the epoch differently. A stream's position counts batches per reader, and its readers are the
    world size x max(workers, 1): both must be the saved ones (0 and 1 workers are both one reader).
    """
    saved_world = state.get("world_size", world_size)  # format 2 saved neither; its batch count check remains
    if saved_world != world_size:
        raise ConfigError(
            f"the checkpoint's run had {saved_world} processes (trainer.devices x trainer.num_nodes), this one has "
            f"{world_size}: another world size deals the epoch's records differently; resume with "
            f"{saved_world} processes"
        )
    saved_workers = state.get("num_workers", num_workers)
    if stream and max(saved_workers, 1) != max(num_workers, 1):
        raise ConfigError(
            f"data.num_workers={saved_workers} was saved and data.num_workers={num_workers} is set: a stream is "
            f"dealt to ranks x workers, so resuming here would skip or repeat records; pass "
            f"data.num_workers={saved_workers} to resume"
        )


def check_format(state: dict[str, Any], kind: str) -> None:
    """A position this version can read, of this kind of loader (map-style or stream)."""
    if state.get("format") not in (1, 2, STATE_FORMAT):
        raise ConfigError(f"the checkpoint's data position has format {state.get('format')}; expected {STATE_FORMAT}")
    saved = state.get("kind", "map")
    if saved != kind:
        raise ConfigError(
            f"the checkpoint's data position is a {saved} position, this run reads data as a {kind}: "
            "data.streaming must be what the run started with"
        )


class ResumableLoader:
    """Batches of epoch 0, 1, 2, ... from `batcher`, resumable at any committed (epoch, batch)."""

    def __init__(self, dataset: Dataset, batcher: Batcher, collate_fn: Callable, num_workers: int, pin_memory: bool):
        self.batcher, self.num_workers = batcher, num_workers
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
            "kind": "map",
            "epoch": self.epoch,
            "batch": self.batch,
            "batches_in_epoch": self._batches_in(self.epoch),
            "order": self.batcher.order_version,
            "world_size": self.batcher.num_replicas,
            "num_workers": self.num_workers,  # for the record: a map-style position holds on any worker count
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_format(state, "map")
        ours = self.batcher.order_version
        theirs = state.get("order", ours.split("/")[0] + "/1")  # format 1: every strategy's first order
        if theirs != ours:
            raise ConfigError(
                f"the checkpoint's batches were planned as {theirs}, this version plans {ours}: resuming would serve "
                "a different data order; finish the run with the version that started it, or start a new run"
            )
        check_machine(state, self.batcher.num_replicas, self.num_workers, stream=False)
        now = self._batches_in(state["epoch"])
        if now != state["batches_in_epoch"]:
            raise ConfigError(
                f"the checkpoint's epoch {state['epoch']} had {state['batches_in_epoch']} batches per rank, this run "
                f"makes {now}: the data, data.max_tokens/batch_size/max_length or the device count changed; resume "
                "with the settings the run started with"
            )
        self.epoch, self.batch = state["epoch"], state["batch"]


class StreamLoader:
    """A streamed run's training batches (streaming.StreamingFastaDataset), resumable at any committed batch.

    Its position is the number of batches this rank has trained on; the DataLoader takes them from its workers in
    turn, so each reader's count follows from it (`StreamingFastaDataset._reader`). Like `ResumableLoader`, it
    moves only at `commit`, when an update has used a batch: a stop inside an accumulation window resumes at the
    window's start, whatever Lightning has fetched or counted.
    """

    def __init__(self, dataloader: DataLoader, world_size: int, num_workers: int, start: int = 0):
        self.dataloader, self.dataset = dataloader, dataloader.dataset
        self.world_size, self.num_workers = world_size, num_workers
        self.batches = start  # batches of this rank trained on: the next one to train on

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.skip_batches = self.batches  # each reader skips its share (set before the workers start)
        for index, batch in enumerate(self.dataloader, start=self.batches):
            batch[POSITION_KEY] = (0, index)  # one endless stream: epoch 0 of the loader, batch `index`
            yield batch

    def commit(self, position: tuple[int, int]) -> None:
        """An update has used the batch at `position`: a resume continues after it."""
        self.batches = position[1] + 1

    def state_dict(self) -> dict[str, Any]:
        readers = max(self.num_workers, 1)
        return {
            "format": STATE_FORMAT,
            "kind": "stream",
            "batches": self.batches,
            # Batches each of the rank's readers has served (reader r serves batches r, r + R, ...): for the record.
            "reader_batches": [len(range(r, self.batches, readers)) for r in range(readers)],
            "order": STREAM_ORDER,
            "batch_size": self.dataset.batch_size,  # what `batches` counts in
            "world_size": self.world_size,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_format(state, "stream")
        check_machine(state, self.world_size, self.num_workers, stream=True)
        saved = state.get("batch_size", self.dataset.batch_size)
        if saved != self.dataset.batch_size:
            raise ConfigError(
                f"data.batch_size={saved} was saved and data.batch_size={self.dataset.batch_size} is set: the stream's "
                f"position counts batches of {saved}; pass data.batch_size={saved} to resume"
            )
        self.batches = state["batches"]
