"""Throughput and model FLOPs utilisation, measured per logging interval without syncing the device.

Lightning's `ThroughputMonitor` synchronises the GPU every micro-batch and assumes a constant batch size; token
budgets vary per batch. This meter reads the host-side token counts of each update (made in collate) and the
wall time between two reads of the module's updates: those reads wait for the device, so the time is honest.
"""

import time

import pytorch_lightning as pl

from protein_mlm.model.perf import flops_per_step
from protein_mlm.training.updates import UpdateRecord


class ThroughputMeter(pl.Callback):
    """Logs perf/tokens_per_sec, perf/tflops and (with a known peak) perf/mfu at the last update of each read."""

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops  # the accelerator's peak at this precision; None = no MFU
        self._since: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        pl_module.window.subscribe(self.measure)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()  # validation time is not training throughput

    def measure(self, records: list[UpdateRecord]) -> None:
        """Tokens/s over all ranks (the update's all-reduce summed them); TFLOP/s and MFU per device."""
        now = time.perf_counter()
        since, self._since = self._since, now
        if since is None or not records:
            return
        seconds = max(now - since, 1e-9)
        tokens = sum(r.all_tokens for r in records)
        arch = self._module.hparams.architecture
        flops = sum(
            flops_per_step(
                self._module.num_params, arch["num_hidden_layers"], arch["hidden_size"], r.tokens, r.squared_lengths
            )
            for r in records
        )
        metrics = {"perf/tokens_per_sec": tokens / seconds, "perf/tflops": flops / seconds / 1e12}  # this rank's FLOPs
        if self.peak_tflops:
            metrics["perf/mfu"] = metrics["perf/tflops"] / self.peak_tflops
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=records[-1].step)
