"""Lightning callbacks: one LR value per optimizer step, a validation at the last step, the progress bar."""

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar


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
        stats = self._extract_stats(trainer, "step")
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
    """Rich progress bar that does not print Lightning's "Epoch 0/-2" when only max_steps bounds the run."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch}"
