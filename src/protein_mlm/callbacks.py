"""Lightning callbacks: per-step LR, validation at the last step, divergence guard, progress bar."""

import collections
import logging
import math
import os
import signal
import statistics
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .errors import UserError

log = logging.getLogger(__name__)


class StepLearningRateMonitor(LearningRateMonitor):
    """`LearningRateMonitor` that logs exactly one value per optimizer step.

    The stock callback logs only when `trainer.log_every_n_steps` allows and, with
    `accumulate_grad_batches=k`, k times per step (once per micro-batch). This one logs on the first
    micro-batch of every accumulation window, at the index of the update that LR is about to be used for.
    """

    def __init__(self, log_momentum: bool = False, log_weight_decay: bool = False):
        super().__init__(logging_interval="step", log_momentum=log_momentum, log_weight_decay=log_weight_decay)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return
        stats = self._extract_stats(trainer, "any")  # every scheduler, also one mis-configured per epoch
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # updates done so far = index of the next
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=step)


class ValidateAtLastStep(pl.Callback):
    """Run validation (and so the best/last checkpoint) after the final optimizer step.

    Lightning validates every `val_check_interval` batches; when `max_steps` is not a multiple of it, the
    run would end with unvalidated steps. Requesting a stop on the last step makes Lightning validate then.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class StepProgressBar(RichProgressBar):
    """Rich progress bar: the LR in scientific notation (not "0.000"), and no "Epoch 0/-2" without max_epochs."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if isinstance(metrics.get("lr"), float):
            metrics["lr"] = f"{metrics['lr']:.2e}"
        return metrics


class TrainingDiverged(UserError):
    """Training produced a non-finite or runaway loss; carries the step it happened at."""

    def __init__(self, step: int, reason: str):
        self.step = step
        super().__init__(
            f"training diverged at step {step}: {reason}; lower optimizer.lr, raise scheduler.warmup_steps "
            "or set trainer.gradient_clip_val (the last good checkpoint is kept)"
        )


class Preempted(UserError):
    """The run was stopped by SIGTERM (e.g. a preempted or timed-out cluster job) after saving a checkpoint."""


class SaveOnPreemption(pl.Callback):
    """On SIGTERM (SLURM sends it before the time limit), save `last.ckpt`, then let the run stop.

    Lightning alone stops on SIGTERM but saves nothing; it raises SIGTERMException after the current batch,
    which reaches this hook with the model, optimizer, scheduler and data position intact.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.dirpath / "last.ckpt")


class DivergenceGuard(pl.Callback):
    """Stop at the first non-finite loss or gradient norm, or after `patience` steps with loss > `max_loss`;
    warn about a loss spike (over `spike_factor` x the median of the last `spike_window` batches).

    Raising before the optimizer step keeps NaNs out of the weights, and Lightning saves no checkpoint on
    an exception, so `last.ckpt` stays the last good one. Also logs `train/grad_norm` every step.
    """

    def __init__(self, max_loss: float = 10.0, patience: int = 20, spike_factor: float = 1.5, spike_window: int = 50):
        self.max_loss, self.patience = max_loss, patience
        self.spike_factor, self.recent = spike_factor, collections.deque(maxlen=spike_window)
        self._steps_above = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # Each rank holds a shard: the root module's norm is the global one on every rank (max_norm inf
            # scales nothing), so all ranks stop together. Not exercised by the tests: FSDP needs GPUs.
            norm = float(trainer.model.clip_grad_norm_(float("inf")))
        else:  # one device, or DDP (gradients already averaged, identical on every rank)
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        step = trainer.global_step
        if not math.isfinite(norm):
            raise TrainingDiverged(step, f"gradient norm is {norm}")
        for logger in trainer.loggers:
            logger.log_metrics({"train/grad_norm": norm}, step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        step = max(trainer.global_step - 1, 0)  # the update this batch belonged to (or the one before it)
        if not math.isfinite(loss):
            raise TrainingDiverged(step, f"loss is {loss}")
        if len(self.recent) >= 10 and loss > self.spike_factor * statistics.median(self.recent):
            log.warning("loss spike at step %d: %.4g, over %g x the recent median", step, loss, self.spike_factor)
        self.recent.append(loss)
        self._steps_above = self._steps_above + 1 if loss > self.max_loss else 0
        if self._steps_above >= self.patience:
            raise TrainingDiverged(step, f"loss above {self.max_loss} for {self.patience} batches (now {loss:.3g})")


class FaultInjector(pl.Callback):
    """Tests only: kill this process with SIGKILL (no cleanup, as a crash) when a given step starts."""

    def __init__(self, kill_at_step: int | None = None):
        self.kill_at_step = kill_at_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
