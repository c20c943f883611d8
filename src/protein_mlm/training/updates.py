"""The update window: the one owner of "an optimizer update ended".

It holds the open update (its micro-batches so far, their device totals, host counts and data position), keeps
each finished update's loss and gradient norm on the device, and reads them to the host in one transfer when a
subscriber's interval or the last step asks for it (or before a validation, a checkpoint and the end of training),
then tells the subscribers, in order.

On a GPU every read of a device value into Python (`float(t)`, `.item()`) waits for the device to finish all
queued work. A step that reads its loss stalls the host once per step; reading a whole logging interval's
numbers at once stalls it once per interval, and every update is still logged at its own step.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from protein_mlm.data.masking import BatchCounts


@dataclass(frozen=True)
class UpdateRecord:
    """One optimizer update, as host values."""

    step: int  # the update's index (the LR monitor's step)
    loss: float  # token-weighted mean over the update's micro-batches and ranks: the optimised objective
    grad_norm: float  # global gradient norm after the rescale, before clipping
    tokens: int  # real (non-pad) tokens on this rank
    padded: int  # tokens including padding on this rank
    squared_lengths: int  # sum of sequence lengths squared on this rank (attention FLOPs)
    tokens_seen: int  # real tokens trained on so far by all ranks, this update included
    all_tokens: int  # real tokens of this update over all ranks (summed by the update's all-reduce under DDP)


Listener = Callable[[list[UpdateRecord]], None]


class UpdateWindow:
    """The open update and the finished ones not yet read; `subscribe` to be told of them, `read` to read now."""

    def __init__(self):
        # Real (non-pad) tokens all ranks trained on up to the last read update; kept across resumes (checkpoints).
        self.tokens_seen = 0
        self.latest: UpdateRecord | None = None  # the newest update read so far
        self.last_step = 0  # trainer.max_steps (0: none): its update is always read
        self.read_at = time.monotonic()  # when updates were last read (tokens_seen holds up to then)
        self._listeners: list[Listener] = []
        self._intervals: set[int] = set()  # read at the end of every n-th update, for each n
        self._device: list[torch.Tensor] = []  # (loss, grad_norm) per finished, unread update
        self._host: list[tuple[int, int, int, int]] = []
        self._open()

    def _open(self) -> None:
        self.pending = 0  # micro-batches of the open update so far; 0 at an update boundary
        self._loss_sum: torch.Tensor | float = 0.0
        self._targets: torch.Tensor | int = 0
        self._counts = BatchCounts(0, 0, 0)
        self._position: tuple[int, int] | None = None

    def add(self, loss_sum: torch.Tensor, targets: torch.Tensor, counts: BatchCounts, position) -> None:
        """One micro-batch: its summed loss and target count (device tensors, never read here), its host counts
        and its data position (loader.POSITION_KEY)."""
        self._loss_sum = self._loss_sum + loss_sum.detach()
        self._targets = self._targets + targets
        self._counts = BatchCounts(*map(sum, zip(self._counts, counts, strict=True)))
        self.pending += 1
        self._position = position

    @property
    def tokens(self) -> int:
        """The open update's real tokens on this rank (host counts)."""
        return self._counts.tokens

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The open update's summed token loss and target count, on the device."""
        return self._loss_sum, self._targets

    def end(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, all_tokens: torch.Tensor | None = None
    ) -> tuple[int, int] | None:
        """The open update ended as optimizer step `step`: queue it and open the next; returns the data position of
        its last batch (where a resume continues from). `all_tokens`: its real tokens over all ranks, on the device
        (DDP's all-reduce); None in a single process."""
        counts, position = self._counts, self._position
        if all_tokens is None:  # a fill, not a host-to-device copy
            all_tokens = torch.full_like(loss, float(counts.tokens), dtype=torch.float64)
        row = [loss.detach().double(), grad_norm.detach().double().to(loss.device), all_tokens.double()]
        self._device.append(torch.stack(row))
        self._host.append((step, counts.tokens, counts.padded, counts.squared_lengths))
        self._open()
        return position

    def subscribe(self, listener: Listener | None = None, every_n_steps: int | None = None) -> None:
        """Be told of every update when it is read; `every_n_steps`: also have them read every n-th update."""
        if listener is not None and listener not in self._listeners:
            self._listeners.append(listener)
        if every_n_steps:
            self._intervals.add(every_n_steps)

    def due(self, done: int) -> bool:
        """Whether the update that makes `done` updates is read at its end: a subscriber's interval, or the last."""
        return any(done % n == 0 for n in self._intervals) or 0 < self.last_step <= done

    def read(self) -> list[UpdateRecord]:
        """Read every finished update (one host transfer) and tell the subscribers, in order."""
        if not self._host:
            return []
        values = torch.stack(self._device).tolist()  # the one host sync
        records = []
        for (loss, norm, all_tokens), (step, tokens, padded, squared) in zip(values, self._host, strict=True):
            self.tokens_seen += round(all_tokens)
            records.append(UpdateRecord(step, loss, norm, tokens, padded, squared, self.tokens_seen, round(all_tokens)))
        self._device, self._host = [], []
        self.latest, self.read_at = records[-1], time.monotonic()
        for listener in self._listeners:
            listener(records)
        return records
