"""Stop signals: SIGTERM, SIGUSR1 and SIGUSR2 all ask the run to save `last.ckpt` at an update boundary and stop.

Cluster schedulers end long runs by signal: SLURM sends SIGTERM at a preemption, `scancel` and the time limit, and
the early warning that `sbatch --signal` asks for (SIGUSR2 from hydra-submitit-launcher's `signal_delay_s`, SIGUSR1
for Lightning's own convention). An unhandled SIGUSR1/2 ends a process at once, so every one of them is caught from
the moment training starts to be set up, and remembered; callbacks.ResumeCheckpoint acts on it at the next update
boundary. SIGUSR1/2 mean "out of time, come back": after the save the job is requeued (`requeue`). SIGTERM means
stop (a cancel, or a preemption that SLURM requeues itself).

Handlers that were there before (submitit's, in a submitit job) are kept aside, not called from the signal:
submitit's USR2 handler would requeue and exit at once, before anything is saved; it is called after the save.
"""

import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # the time-limit warnings: the job continues after a requeue


class StopSignals:
    """Which stop signal this process received (first one wins, a requeue signal over SIGTERM), and the handlers
    installed before ours."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Callable | int | None] = {}
        self.listeners: list[Callable[[int], None]] = []  # told of each signal, inside the handler

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def requeue(self) -> bool:
        return self.signum in REQUEUE_SIGNALS

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def handle(self, signum: int, frame=None) -> None:
        if self.signum is None or (signum in REQUEUE_SIGNALS and not self.requeue):
            self.signum = signum
        for listener in list(self.listeners):
            listener(signum)

    def install(self) -> None:
        """Catch the stop signals from now on (a fresh state), keeping the handlers found for `requeue`."""
        self.signum, self.listeners = None, []
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a sweep's thread-pool job has none to catch)
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self.take_over()

    def take_over(self) -> None:
        """Put our handler back in place (Lightning's fit installs its own SIGTERM handler)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.handle)

    def uninstall(self) -> None:
        """The handlers from before `install` again."""
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self.previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous, self.listeners = {}, []

    def submitit_requeue(self) -> Callable | None:
        """submitit's preemption handler (it checkpoints the job's pickle, requeues it and exits), if it was set."""
        for handler in self.previous.values():
            if getattr(handler, "__name__", "") == "checkpoint_and_try_requeue":
                return handler
        return None


STOP = StopSignals()  # signals are per process, so is this


def slurm_job_id() -> str | None:
    """The SLURM job to requeue (an array task as `<array job>_<task>`), None outside a SLURM job."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(signum: int) -> str:
    """Requeue this job, on global rank 0 after `last.ckpt` is written: submitit's way when submitit runs it, else
    `scontrol requeue $SLURM_JOB_ID`. Returns what happened, for the final message; never raises for a missing
    scontrol (a warning: the checkpoint is saved, the user can resubmit)."""
    handler = STOP.submitit_requeue()
    if handler is not None:
        try:  # requeues and exits (SystemExit), as submitit would have on the signal itself
            handler(signum, None)
        except Exception as e:  # it refuses past hydra.launcher.max_num_timeout requeues after a time limit
            return f"not requeued by submitit ({' '.join(str(e).split())[:200]})"
        return "requeued by submitit"
    job = slurm_job_id()
    if job is None:
        return "not requeued (not a SLURM job)"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("cannot requeue SLURM job %s: no scontrol on PATH; resubmit the same command to continue", job)
        return f"not requeued (no scontrol for job {job})"
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, " ".join(result.stderr.split())[:200])
        return f"not requeued (scontrol requeue {job} failed)"
    return f"requeued SLURM job {job}"
