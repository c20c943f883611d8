"""Per-update training numbers, kept on the device as they are made and read to the host in one transfer.

On a GPU every read of a device value into Python (`float(t)`, `.item()`) waits for the device to finish all
queued work. A step that reads its loss stalls the host once per step; reading a whole logging interval's
numbers at once stalls it once per interval, and every update is still logged at its own step.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UpdateRecord:
    """One optimizer update, as host values."""

    step: int  # the update's index (the LR monitor's step)
    loss: float  # token-weighted mean over the update's micro-batches and ranks: the optimised objective
    grad_norm: float  # global gradient norm after the rescale, before clipping
    tokens: int  # real (non-pad) tokens on this rank
    padded: int  # tokens including padding on this rank
    squared_lengths: int  # sum of sequence lengths squared on this rank (attention FLOPs)
    tokens_seen: int  # real tokens trained on so far, this update included


Listener = Callable[[list[UpdateRecord]], None]


class UpdateLog:
    """Buffers updates whose loss and norm are still device tensors; `flush` reads them all with one transfer."""

    def __init__(self):
        self._device: list[torch.Tensor] = []  # (loss, grad_norm) per pending update
        self._host: list[tuple[int, int, int, int, int]] = []
        self.listeners: list[Listener] = []
        self.latest: UpdateRecord | None = None  # the newest update read so far

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, counts, tokens_seen: int) -> None:
        """Queue one update; `counts` is the update's BatchCounts summed over its micro-batches."""
        self._device.append(torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]))
        self._host.append((step, counts.tokens, counts.padded, counts.squared_lengths, tokens_seen))

    def subscribe(self, listener: Listener) -> None:
        if listener not in self.listeners:
            self.listeners.append(listener)

    def flush(self) -> list[UpdateRecord]:
        """Read every pending update (one host transfer) and hand the records to the listeners, in order."""
        if not self._host:
            return []
        values = torch.stack(self._device).tolist()  # the one host sync
        records = [
            UpdateRecord(step, loss, norm, tokens, padded, squared, seen)
            for (loss, norm), (step, tokens, padded, squared, seen) in zip(values, self._host, strict=True)
        ]
        self._device, self._host = [], []
        self.latest = records[-1]
        for listener in self.listeners:
            listener(records)
        return records
