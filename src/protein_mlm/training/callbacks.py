"""Lightning callbacks: per-step LR, validation at the last step, resume checkpoints, divergence guard, progress."""

import collections
import logging
import math
import re
import signal
import statistics
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from protein_mlm.data.loader import ResumableLoader
from protein_mlm.errors import TrainingDiverged
from protein_mlm.reporting.console import stdout_is_terminal
from protein_mlm.training import lightning_seams
from protein_mlm.training.stopping import STOP

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
        stats = lightning_seams.learning_rate_stats(self, trainer)
        step = lightning_seams.logger_step(trainer)  # updates done so far = index of the next
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


class StepProgressBar(lightning_seams.DescribedRichProgressBar):
    """Rich progress bar in optimizer updates out of `max_steps` (not micro-batches), the LR in scientific notation,
    and the data epoch (the training loader's, not Lightning's single endless epoch)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not stdout_is_terminal():  # redirected output: console.PlainProgress prints plain lines instead
            self.disable()
        super().setup(trainer, pl_module, stage)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        # The stock hook shows `batch_idx + 1` batches done (and opens the bar when resumed mid-epoch): updates here.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Host values only: the LR, the loss of the last update read, the data epoch (a refresh never syncs)."""
        metrics = super().get_metrics(trainer, pl_module)
        if trainer.optimizers:
            metrics["lr"] = f"{trainer.optimizers[0].param_groups[0]['lr']:.2e}"
        if pl_module.window.latest is not None:
            metrics["loss"] = f"{pl_module.window.latest.loss:.4f}"
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):  # a streamed run has no epoch count
            metrics["epoch"] = loader.epoch
        return metrics


def save_together(trainer: pl.Trainer, path: str | Path) -> None:
    """`trainer.save_checkpoint`, except that under DDP the ranks meet in an all-reduce of "did this rank fail" in
    place of Lightning's closing barrier: a rank that fails while saving stops the others at once, where the
    barrier would keep them waiting for it until the process group's timeout (30 min)."""
    if trainer.world_size == 1:
        trainer.save_checkpoint(path)
        return
    error = None
    try:
        checkpoint = lightning_seams.dump_checkpoint(trainer)
        trainer.strategy.save_checkpoint(checkpoint, path)  # rank 0 writes
    except Exception as e:
        error = e
    failed = torch.tensor(float(error is not None), device=trainer.strategy.root_device)
    failed = trainer.strategy.reduce(failed, reduce_op="sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RuntimeError(f"{int(failed.item())} other rank(s) failed while saving {path}; see their logs")


class StopRequested(SIGTERMException):
    """Raised on every rank at the update boundary where the run stops for `signum` (Lightning lets it through)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ResumeCheckpoint(pl.Callback):
    """`last.ckpt`, the one checkpoint `resume=` continues from, always the newest and always at an update boundary.

    Written at the start of the batch after an update (so every hook of that update, validation included, has
    run): every `every_n_train_steps` updates, after each validation, on a stop signal, and when training ends. A
    stop signal (SIGTERM, SIGUSR1, SIGUSR2: training.stopping) is acted on at the next micro-batch: the checkpoint
    points at the current window's start, the window's partial gradients are dropped, and the run stops at once.
    Under DDP all ranks stop together at an update boundary a few updates later (training.agreement: no collective
    of its own). A signal during a validation lets that validation finish first: it belongs to the update before
    it. A signal during setup stops the run before its first update, with nothing new to save.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1
        self._validated = False
        self._pending: int | None = None  # micro-batches of the open window, while this callback saves
        self._before_start: int | None = None  # the stop signal all ranks agree came during setup

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step = trainer.global_step  # the state it resumed from is on disk already
        if trainer.world_size > 1:
            # Lightning broadcasts rank 0's SIGTERM flag and reads it on the host before every micro-batch; the
            # ranks agree on a stop signal with each update's all-reduce instead (_stop_now).
            lightning_seams.skip_sigterm_broadcast(trainer)
        # In place of Lightning's SIGTERM handler, which would raise at the end of this batch or inside a validation
        # (we stop at an update instead) and broadcast from inside the signal handler. One that came since fit began
        # is in STOP already: Lightning's flag for it must not raise either.
        STOP.take_over()
        lightning_seams.clear_lightning_sigterm(trainer)
        launcher = trainer.strategy.launcher

        def on_signal(signum: int) -> None:
            if pl_module.stop_signal is None and launcher is not None:
                launcher.kill(signum)  # forward it to the DDP children this process started, as Lightning does
            pl_module.stop_signal = STOP.signum  # the module votes with its next update's totals

        STOP.listeners.append(on_signal)
        pl_module.stop_signal = STOP.signum  # one that came during setup
        self._before_start = pl_module.stop_signal
        if trainer.world_size > 1:  # one blocking vote, once: all ranks stop before the first update, or none
            self._before_start = pl_module.agreement.agree_now(pl_module.stop_signal, pl_module.device)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        at_boundary = pl_module.window.pending == 0
        stop = self._stop_now(trainer, pl_module, at_boundary)  # every rank decides alike at the same micro-batch
        due = trainer.global_step % self.every_n_train_steps == 0 or self._validated
        if (stop or (at_boundary and due)) and (trainer.global_step > self._saved_step or self._validated):
            self.save(trainer, pl_module)  # never over a checkpoint of the same state (a stop before any update)
        if stop:
            raise StopRequested(stop)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.window.read()  # logged and judged before the guard's state is saved
        self._pending = pl_module.window.pending
        save_together(trainer, self.path)  # every rank calls it; rank 0 writes
        self._saved_step, self._validated = trainer.global_step, False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._pending is not None:  # only checkpoints this callback writes; the best ones are Lightning's own
            lightning_seams.rewind_to_last_update(checkpoint, self._pending, trainer.val_check_batch)
            self._pending = None

    def _stop_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_boundary: bool) -> int | None:
        """The stop signal to stop for now, or None. One process: at once. DDP: a signal may reach only some ranks,
        so each rank's vote travels with the update's all-reduce (training.agreement) and all ranks stop at the
        same update boundary, a few updates on; one that came during setup was agreed on before the first update."""
        if self._before_start is not None:
            return self._before_start
        if trainer.world_size == 1:
            return pl_module.stop_signal
        return pl_module.agreement.stop_agreed(trainer.global_step) if at_boundary else None


class BestCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for the best validation loss that, on resume, removes best files the resumed run will
    redo: ones written after the checkpoint it resumes from (a crash between the two writes), so `save_top_k`
    holds and `resolve_checkpoint` never picks a model from an abandoned continuation."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not trainer.is_global_zero or self.dirpath is None or not trainer.global_step:
            return
        kept = {Path(p).resolve() for p in self.best_k_models} | {Path(self.best_model_path).resolve()}
        for path in Path(self.dirpath).glob("best-*.ckpt"):
            step = re.search(r"step(\d+)", path.name)
            if path.resolve() not in kept and step and int(step.group(1)) > trainer.global_step:
                log.info("removing %s: written after the checkpoint this run resumes from", path.name)
                path.unlink()


class DivergenceGuard(pl.Callback):
    """Stop at the first non-finite loss or gradient norm, or after `patience` updates with loss > `max_loss`;
    warn about a loss spike (over `spike_factor` x the median of the last `spike_window` updates).

    It judges each update's token-weighted loss and its gradient norm after the rescale, so `max_loss`, the spike
    factor and both windows mean the same at any `accumulate_grad_batches`. It reads them when the module reads
    its updates (once per logging interval, and before every checkpoint); a non-finite update was already kept
    out of the weights on the device (`MaskedLMModule._skip_if_not_finite`), so the last checkpoint is a good one.
    Its windows are saved in checkpoints, so a resumed run judges as the uninterrupted one would.
    """

    def __init__(self, max_loss: float = 10.0, patience: int = 20, spike_factor: float = 1.5, spike_window: int = 50):
        self.max_loss, self.patience = max_loss, patience
        self.spike_factor, self.recent = spike_factor, collections.deque(maxlen=spike_window)
        self._steps_above = 0
        self._scaled = False  # fp16's loss scaler skips non-finite steps and lowers its scale: not divergence

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        pl_module.window.subscribe(self.judge)

    def judge(self, records) -> None:
        """Check each update in order (UpdateRecords)."""
        for record in records:
            loss, step = record.loss, record.step
            if not math.isfinite(loss):
                raise TrainingDiverged(step, f"loss is {loss}")
            if not math.isfinite(record.grad_norm) and not self._scaled:
                raise TrainingDiverged(step, f"gradient norm is {record.grad_norm}")
            if len(self.recent) >= 10 and loss > self.spike_factor * statistics.median(self.recent):
                log.warning("loss spike at step %d: %.4g, over %g x the recent median", step, loss, self.spike_factor)
            self.recent.append(loss)
            self._steps_above = self._steps_above + 1 if loss > self.max_loss else 0
            if self._steps_above >= self.patience:
                raise TrainingDiverged(step, f"loss above {self.max_loss} for {self.patience} updates (now {loss:.3g})")

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "steps_above": self._steps_above}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state_dict.get("recent", []))
        self._steps_above = state_dict.get("steps_above", 0)
