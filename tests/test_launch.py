"""What `launch` reads from each launcher's environment: one table, one row per way a process gets started."""

import pytest

from protein_mlm import launch

# Every variable any launcher below sets; each row starts from none of them.
LAUNCHER_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "JSM_NAMESPACE_RANK", "JSM_NAMESPACE_LOCAL_RANK", "SUBMITIT_EXECUTOR",
)  # fmt: skip

# (launcher, environment, launched together with its peers, global rank, shared run id)
TABLE = [
    ("python train.py", {}, False, 0, None),
    ("torchrun --nproc-per-node 1", {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "1", "RANK": "0",
                                     "LOCAL_RANK": "0"}, False, 0, None),
    ("torchrun 2 nodes x 2, node 1 rank 3", {"TORCHELASTIC_RUN_ID": "exp7", "WORLD_SIZE": "4", "RANK": "3",
                                             "LOCAL_RANK": "1", "GROUP_RANK": "1"}, True, 3, "torchrun-exp7"),
    ("srun --ntasks 8, task 5", {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
                                 "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, True, 5, "slurm-42"),
    # An sbatch --ntasks=4 batch shell runs one process; its peers exist only if it calls srun.
    ("sbatch --ntasks 4, the batch shell", {"SLURM_JOB_ID": "43", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
                                            "SLURM_LOCALID": "0"}, False, 0, "slurm-43"),
    # submitit's job runs under srun, one task per GPU.
    ("hydra-submitit 2 nodes x 4, task 6", {"SLURM_JOB_ID": "44", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
                                            "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
                                            "SUBMITIT_EXECUTOR": "slurm"}, True, 6, "slurm-44"),
    # Lightning's own launcher: a child it spawned on node 0 follows rank 0's run dir; node 1 is started by hand.
    ("Lightning devices=2, child", {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, False, 1, None),
    ("Lightning num_nodes=2, node 1", {"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "4"}, True, 1, None),
]  # fmt: skip


@pytest.mark.parametrize(("launcher", "env", "together", "rank", "run_id"), TABLE, ids=[row[0] for row in TABLE])
def test_each_launcher_is_read_alike_everywhere(monkeypatch, launcher, env, together, rank, run_id):
    for key in LAUNCHER_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch.launched_together() is together
    assert launch.distributed_rank() == rank
    assert launch.shared_run_id() == run_id


def test_the_launch_environment_is_read_in_one_module():
    """train.py and cli.py ask `launch` (one answer to "started with its peers?"), never the environment."""
    from tests.conftest import ROOT

    for name in ("train.py", "cli.py"):
        source = (ROOT / "src" / "protein_mlm" / name).read_text()
        for key in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
            assert key not in source, f"{name} reads {key}: ask protein_mlm.launch"
