"""Every use of a Lightning internal, each a small named function: the one place a Lightning upgrade can break.

Each function reads or changes something Lightning does not promise to keep (a `_`-prefixed attribute, the
layout of a checkpoint's `"loops"` state, an internal loop's progress object); its docstring names the guarantee
of ours that depends on it. Every other module uses Lightning's public API only (tests/test_architecture.py
enforces it), and tests/test_lightning_seams.py runs each seam through a tiny `Trainer.fit`, asserting the
guarantee, with the seam's name in every failure. `make lock` runs the whole test suite before pins move, so a
Lightning release that changes one of these fails there, naming the seam.

Written for Lightning 2.6.6. Not Lightning's, left where they are: torch's `GradScaler._get_scale_async`
(training/module.py) and `Optimizer._step_supports_amp_scaling`.
"""

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar


def learning_rate_stats(monitor: LearningRateMonitor, trainer: pl.Trainer) -> dict[str, float]:
    """The LR (and momentum, weight decay) of every optimizer, as `LearningRateMonitor` names and logs them.

    Per-step LR logging: one value per optimizer update, under the stock monitor's names (docs/schedules.md).
    """
    return monitor._extract_stats(trainer, "any")  # "any": also a scheduler mis-configured to step per epoch


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers write metrics at: the updates done so far, the index of the next one.

    Per-step LR logging: the LR of update s is logged at step s, the step `self.log` metrics of that update use.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def is_last_batch(trainer: pl.Trainer) -> bool:
    """True on the last batch of a finite epoch (Lightning then steps the optimizer on a partial window).

    Exact objective: a finite epoch's last, partial accumulation window is rescaled to its own token mean.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """The checkpoint `trainer.save_checkpoint` would write (callbacks' `on_save_checkpoint` included), unwritten.

    DDP saves that fail together: `callbacks.save_together` writes it and meets the other ranks in an all-reduce
    in place of Lightning's closing barrier.
    """
    return trainer._checkpoint_connector.dump_checkpoint()


def rewind_to_last_update(checkpoint: dict[str, Any], pending_micro_batches: int, val_check_batch: float) -> None:
    """Make Lightning's loop counters in `checkpoint` those of the end of the last finished optimizer update.

    Resume exactness: a checkpoint taken inside an accumulation window holds no partial gradients, and the data
    position and token count move only at updates (loader.ResumableLoader.commit); Lightning's batch counters must
    agree, or a resume would shift every later window. The result is the state Lightning itself saves after a
    batch has finished (RESTARTED_ON_LAST); where a validation was due at that batch, Lightning expects the step
    counter from before its final increment and skips the validation on resume (it ran before the checkpoint).
    """
    fit = checkpoint["loops"]["fit_loop"]
    progress = fit["epoch_loop.batch_progress"]
    done = progress["total"]["completed"] - pending_micro_batches
    for scope in ("total", "current"):
        end = progress[scope]["completed"] - pending_micro_batches
        progress[scope].update(ready=end, started=end, processed=end, completed=end)
    progress["is_last_batch"] = False
    if val_check_batch != float("inf") and done > 0 and done % int(val_check_batch) == 0:
        fit["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def skip_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Stop Lightning broadcasting rank 0's SIGTERM flag before every micro-batch (a host read each time).

    No host sync per micro-batch under DDP: the ranks agree on a stop signal with each update's all-reduce
    (training.agreement) instead. A Lightning without the broadcast needs nothing skipped.
    """
    if hasattr(trainer.fit_loop.epoch_loop, "_broadcast_sigterm_tensor"):
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def clear_lightning_sigterm(trainer: pl.Trainer) -> None:
    """Forget a SIGTERM Lightning's own handler saw since fit began (training.stopping.STOP has it already).

    Stop at an update boundary: Lightning would raise at the end of the current batch, inside a window or a
    validation, where the checkpoint must point at the last update.
    """
    trainer._signal_connector.received_sigterm = False


class DescribedRichProgressBar(RichProgressBar):
    """`RichProgressBar` whose training bar reads `train_description` in place of "Epoch N".

    Progress in updates: Lightning runs one endless epoch here, so its epoch number would say nothing.
    """

    train_description = "Training"

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description
