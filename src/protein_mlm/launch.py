"""Who started this process: its rank and device as the launcher (Lightning, torchrun, SLURM) set them in the
environment, read before any process group exists, so nothing here touches a GPU or the network."""

import os

RANK_KEYS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # global rank, as Lightning's environments read it
LOCAL_RANK_KEYS = ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK")


def _first_int(keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def distributed_rank() -> int:
    """This process's global rank; 0 when not launched distributed, and only on the first process of node 0.

    Lightning's own launcher sets just LOCAL_RANK and NODE_RANK in its processes: there the number is > 0 on
    every other process, though not the global rank (that needs the devices per node, unknown here).
    """
    rank = _first_int(RANK_KEYS)
    if rank is not None:
        return rank
    return (_first_int(LOCAL_RANK_KEYS) or 0) + (_first_int(("NODE_RANK", "GROUP_RANK")) or 0)


def local_device(devices=None) -> int:
    """The GPU index this process trains on: Lightning gives local rank r the r-th entry of a list of device ids
    (`trainer.devices=[2,3]`: GPU 3 for local rank 1), else GPU r."""
    rank = _first_int(LOCAL_RANK_KEYS) or 0
    if isinstance(devices, list | tuple) or type(devices).__name__ == "ListConfig":
        return int(devices[rank]) if rank < len(devices) else rank
    return rank


def cores_per_process(devices: int) -> int:
    """The CPU cores this training process may use with its loader workers.

    srun with several tasks binds each task to its own --cpus-per-task cores: the affinity is this process's share
    already. Lightning's launcher and torchrun start their processes with the whole allowance, to be split.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if (_first_int(("SLURM_STEP_NUM_TASKS",)) or 1) > 1:  # one srun task per device
        return cores
    return cores // max(devices, 1)


def launched_together() -> bool:
    """One of several processes that each run train.py themselves: torchrun's, srun's (one task per device), or a
    later node of Lightning's own launcher. Lightning's children on one node get rank 0's run dir instead."""
    if "TORCHELASTIC_RUN_ID" in os.environ and (_first_int(("WORLD_SIZE",)) or 1) > 1:
        return True
    if (_first_int(("SLURM_STEP_NUM_TASKS",)) or 1) > 1:  # srun sets it for its step, not salloc's shell
        return True
    return (_first_int(("NODE_RANK", "GROUP_RANK")) or 0) > 0


def slurm_batch_job() -> bool:
    """Inside a SLURM job that SLURM may requeue (not an interactive `srun --pty bash` / salloc shell; Lightning's
    rule for its SLURM environment)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_restarted() -> bool:
    """A SLURM job started again after a requeue: same job id and command, SLURM_RESTART_COUNT >= 1."""
    return slurm_batch_job() and (_first_int(("SLURM_RESTART_COUNT",)) or 0) >= 1


def shared_run_id() -> str | None:
    """An id every node of this launch sees alike (SLURM's job id, torchrun's --rdzv-id), or None."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return None if run_id in ("", "none") else f"torchrun-{run_id}"
