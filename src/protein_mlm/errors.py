"""Errors caused by the user's input: reported as one line, without a traceback."""

import errno
import sys

EXIT_USER_ERROR = 2
# Failures of the storage, not of the program: one line, like a user error (e.g. a disk that fills up mid-run).
STORAGE_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def fail(message: str) -> None:
    """Report a user error as one line on stderr and exit with EXIT_USER_ERROR (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(UserError):
    """An invalid configuration value."""


class DataError(UserError):
    """An unreadable or invalid data file."""


class TrainingDiverged(UserError):
    """Training produced a non-finite or runaway loss; carries the step it happened at."""

    def __init__(self, step: int, reason: str):
        self.step = step
        super().__init__(
            f"training diverged at step {step}: {reason}; lower optimizer.lr, raise scheduler.warmup_steps "
            "or set trainer.gradient_clip_val (the last good checkpoint is kept)"
        )


class Preempted(UserError):
    """The run was stopped by a stop signal (SIGTERM, SIGUSR1/2: a preempted or timed-out job), after saving."""

    def __init__(self, step: int, message: str):
        self.step = step
        super().__init__(message)
