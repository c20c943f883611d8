"""What the terminal and `train.log` show: plain progress lines when output is not a terminal (nohup, SLURM,
`| tee`), file-only records, and Lightning's noise silenced where it is emitted."""

import logging
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl

from protein_mlm.data.loader import ResumableLoader

PROGRESS = logging.getLogger("protein_mlm.progress")  # on the console only when no progress bar is drawn
FILE_ONLY = logging.getLogger("protein_mlm.record")  # train.log only (e.g. the plan the console shows as a table)

# Lightning messages that tell a user of this template nothing actionable.
QUIET_MESSAGES = (
    "litlogger",  # an advertisement
    "Trainer already configured with model summary callbacks",
    "is not supported by the model summary",  # bf16: size estimate only
    "LeafSpec",  # a deprecation inside Lightning's own pytree helper
    "`weights_only` was not set",
    "You defined a `validation_step` but have no `val_dataloader`",
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in QUIET_MESSAGES)


class _DropLoggers(logging.Filter):
    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(self.names)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def silence_lightning_noise() -> None:
    """Drop Lightning's tips and irrelevant warnings (see QUIET_MESSAGES); idempotent."""
    for fragment in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{fragment}.*")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropMessages) for f in handler.filters):
                handler.addFilter(_DropMessages())


def route_records() -> None:
    """Console handlers skip file-only records, and progress lines too while a progress bar is drawn."""
    hidden = (FILE_ONLY.name, PROGRESS.name) if stdout_is_terminal() else (FILE_ONLY.name,)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
            continue
        handler.filters = [f for f in handler.filters if not isinstance(f, _DropLoggers)]
        handler.addFilter(_DropLoggers(hidden))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class PlainProgress(pl.Callback):
    """One greppable line per interval (every `every_n_steps` updates or `every_seconds`, whichever comes first):
    step, loss, LR, tokens/s, data epoch, elapsed and ETA. Always in train.log; on the console when stdout is not
    a terminal (where the progress bar would be one wrapped line at the end)."""

    def __init__(self, every_n_steps: int = 10, every_seconds: float = 60.0):
        self.every_n_steps, self.every_seconds = max(1, every_n_steps), every_seconds
        self._seen_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The loss to print: read at the same update on every rank (a time-based line, which only rank 0 decides
        # on, prints the last loss read instead).
        pl_module.window.subscribe(every_n_steps=self.every_n_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        route_records()
        self._start = self._last_time = time.monotonic()
        self._start_step = self._seen_step = trainer.global_step
        self._last_tokens, self._last_read = pl_module.window.tokens_seen, self._start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return  # inside an accumulation window
        self._seen_step = step
        by_step = step % self.every_n_steps == 0 or 0 < trainer.max_steps <= step
        now = time.monotonic()
        if not trainer.is_global_zero or not (by_step or now - self._last_time >= self.every_seconds):
            return
        PROGRESS.info(self._line(trainer, pl_module, step, now))
        self._last_time, self._last_tokens, self._last_read = (
            now,
            pl_module.window.tokens_seen,
            pl_module.window.read_at,
        )

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, now: float) -> str:
        total = trainer.max_steps
        parts = [f"step {step}/{total}" if total > 0 else f"step {step}"]
        latest = pl_module.window.latest  # read when this line's update ended (a host sync); not read again here
        if latest is not None:
            parts.append(f"loss {latest.loss:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3e}")
        # All ranks' tokens, known up to the last read update: the rate is over the time between those reads.
        tokens, seconds = pl_module.window.tokens_seen - self._last_tokens, pl_module.window.read_at - self._last_read
        if seconds > 0:  # a line by time with no read since the last line has no new count
            parts.append(f"{tokens / seconds:,.0f} tok/s")
        if isinstance(trainer.train_dataloader, ResumableLoader):  # a streamed run has no epoch count
            parts.append(f"epoch {trainer.train_dataloader.epoch}")
        elapsed = now - self._start
        timing = f"{_duration(elapsed)} elapsed"
        done = step - self._start_step
        if total > 0 and done > 0:
            timing += f", eta {_duration(elapsed / done * (total - step))}"
        parts.append(timing)
        return " | ".join(parts)
