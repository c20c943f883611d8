"""`python tests/submitit_job.py SUBMITIT_FOLDER ARGS`: train.py's command line in a process where submitit's job
signal handlers are installed first, as `python -m submitit.core._submit` installs them in a SLURM job (SIGTERM
bypassed, SIGUSR2 requeues and exits), with a checkpointable job as hydra-submitit-launcher's is."""

import sys
from pathlib import Path

from submitit.core.utils import DelayedSubmission, JobPaths
from submitit.slurm.slurm import SlurmJobEnvironment

from protein_mlm.cli import train_main


class Job:
    """What hydra-submitit-launcher pickles: called to run, `checkpoint` to resubmit itself as it is."""

    def __call__(self) -> None:
        train_main()

    def checkpoint(self) -> DelayedSubmission:
        return DelayedSubmission(self)


if __name__ == "__main__":
    folder = Path(sys.argv.pop(1))
    folder.mkdir(parents=True, exist_ok=True)  # made by submitit at submission
    sys.argv[0] = str(Path(__file__).resolve().parents[1] / "train.py")
    delayed = DelayedSubmission(Job())
    delayed.set_timeout(60, 3)
    env = SlurmJobEnvironment()
    env._handle_signals(JobPaths(folder, job_id=env.job_id, task_id=env.global_rank), delayed)
    delayed.result()
