"""Callbacks that make interruptions and data order observable: for the stop-and-go tests and for debugging."""

import errno
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from protein_mlm.data.loader import POSITION_KEY
from protein_mlm.data.masking import COUNTS_KEY
from protein_mlm.training.stopping import STOP


class Interrupt(pl.Callback):
    """Send this process SIGKILL (a crash) or SIGTERM (a preemption) at one chosen point of training.

    At the start of micro-batch `micro_batch` of update `at_step`, or, with `in_validation=true`, after the first
    batch of the validation that follows update `at_step`.
    """

    def __init__(self, at_step: int, signal_name: str = "KILL", micro_batch: int = 0, in_validation: bool = False):
        self.at_step, self.micro_batch, self.in_validation = at_step, micro_batch, in_validation
        self.signal = getattr(signal, f"SIG{signal_name.upper().removeprefix('SIG')}")
        self._sent = False

    def _send(self) -> None:
        if not self._sent:
            self._sent = True
            os.kill(os.getpid(), self.signal)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        pending = pl_module.window.pending
        if not self.in_validation and trainer.global_step == self.at_step and pending == self.micro_batch:
            self._send()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.in_validation and not trainer.sanity_checking and trainer.global_step == self.at_step:
            self._send()


class AwaitSignal(pl.Callback):
    """At the start of update `at_step` on global rank `rank`, write this process's id to `pid_file` and wait (at
    most `timeout_s`) until a stop signal arrives: another process sends it at a known update."""

    def __init__(self, at_step: int, pid_file: str, rank: int = 0, timeout_s: float = 120.0):
        self.at_step, self.pid_file, self.rank, self.timeout_s = at_step, Path(pid_file), rank, timeout_s

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step != self.at_step or pl_module.window.pending or trainer.global_rank != self.rank:
            return
        self.pid_file.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout_s
        while not STOP.received and time.monotonic() < deadline:
            time.sleep(0.01)


class FailingSave(pl.Callback):
    """Raise on global rank `rank` while the checkpoint of update `at_step` is being made (a rank failing mid-save)."""

    def __init__(self, at_step: int, rank: int = 1):
        self.at_step, self.rank = at_step, rank

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step == self.at_step and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} while saving step {self.at_step}")


def batch_digest(batch: dict[str, Any]) -> str:
    """A short digest of a batch's token ids and labels: equal digests, equal training content."""
    digest = hashlib.blake2b(digest_size=8)
    for key in ("input_ids", "labels"):
        digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()


class DiskFull(pl.Callback):
    """From update `at_step` on, every checkpoint write fails with `errno_name` (ENOSPC: disk full; EACCES)."""

    def __init__(self, at_step: int, errno_name: str = "ENOSPC"):
        self.at_step, self.errno = at_step, getattr(errno, errno_name)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step < self.at_step or getattr(torch.save, "failing", False):
            return
        code = self.errno

        def failing_save(obj, f, *save_args, **save_kwargs):
            raise OSError(code, os.strerror(code), getattr(f, "name", str(f)))

        failing_save.failing = True
        torch.save = failing_save


class BatchRecorder(pl.Callback):
    """Append one JSON line per training micro-batch: update, micro-batch, data position, content digest, real
    tokens."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "micro": pl_module.window.pending,
            "position": list(batch.get(POSITION_KEY, ())),
            "digest": batch_digest(batch),
            "tokens": int(batch[COUNTS_KEY].tokens),  # real tokens: what train/tokens_seen counts
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path = self.path if trainer.world_size == 1 else self.path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
