"""Jobs that outlive their allocation: a stop signal (SIGUSR2 from submitit's `signal_delay_s`, SIGUSR1, SIGTERM)
sent by another process to one rank of a SLURM job at a known update; every rank stops at one update boundary with
last.ckpt saved, the job is requeued (a fake `scontrol` records the call), and the byte-identical command run again
as the requeued job (same SLURM_JOB_ID, SLURM_RESTART_COUNT=1) continues: LR and loss per step equal an
uninterrupted run's. Each "task" is a process with the variables srun sets; ranks talk over gloo on localhost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protein_mlm.reporting.tblog import read_scalars
from tests.conftest import ROOT, TINY
from tests.test_multinode import free_port

MAX_STEPS = 8
COMMAND = [
    *[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))],
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=4",
    "num_threads=1",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def fake_scontrol(folder: Path) -> Path:
    """A `scontrol` on PATH that appends its arguments to folder/scontrol.calls."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.calls"}\n')
    script.chmod(0o755)
    return folder


def slurm_env(job_id: int, rank: int, ntasks: int, restarts: int, port: int, bin_dir: Path | None) -> dict[str, str]:
    """The variables a task of an sbatch job started by srun sees (one node, one task per rank)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(
        PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        PROTEIN_MLM_CONFIGS=str(ROOT / "configs"),
        OMP_NUM_THREADS="1",
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="pretrain",
        SLURM_NTASKS=str(ntasks),
        SLURM_NTASKS_PER_NODE=str(ntasks),
        SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODELIST="127.0.0.1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if restarts:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def run_job(
    cwd: Path, job_id: int, args: list[str], ntasks: int = 1, restarts: int = 0, bin_dir: Path | None = None, send=None
) -> list[subprocess.CompletedProcess]:
    """`srun python train.py ARGS` with `ntasks` tasks; `send(processes)` runs while they train."""
    port = free_port()
    tasks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=cwd,
            env=slurm_env(job_id, rank, ntasks, restarts, port, bin_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ntasks)
    ]
    if send is not None:
        send(tasks)
    results = []
    for task in tasks:
        out, err = task.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(task.args, task.returncode, out, err))
    return results


def signal_at(pid_file: Path, signum: int, timeout_s: float = 300.0):
    """Wait until the rank waiting in debug.callbacks.AwaitSignal wrote its pid, then send it `signum`."""

    def send(tasks: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + timeout_s
        while not (pid_file.is_file() and pid_file.read_text()):
            assert time.monotonic() < deadline and all(t.poll() is None for t in tasks), "no rank reached the update"
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signum)

    return send


def await_signal(at_step: int, rank: int, pid_file: Path) -> list[str]:
    prefix = "+callbacks.await_signal"
    return [
        f"{prefix}._target_=protein_mlm.training.debug.callbacks.AwaitSignal",
        f"{prefix}.at_step={at_step}",
        f"{prefix}.rank={rank}",
        f"{prefix}.pid_file={pid_file}",
    ]


def per_step(run_dir: Path) -> dict[str, dict[int, float]]:
    return {tag: dict(points) for tag, points in read_scalars(run_dir).items()}


def assert_joined_equals_straight(joined: Path, straight: Path) -> None:
    ours, theirs = per_step(joined), per_step(straight)
    assert sorted(ours["train/loss"]) == list(range(MAX_STEPS)) == sorted(theirs["train/loss"])
    assert ours["lr-inverse_sqrt"] == theirs["lr-inverse_sqrt"]
    steps = range(MAX_STEPS)
    assert [ours["train/loss"][s] for s in steps] == pytest.approx([theirs["train/loss"][s] for s in steps], abs=1e-5)


def stop_and_requeue(tmp_path: Path, straight: Path, signum: int, ntasks: int, extra: list[str]) -> None:
    """One job stopped by `signum` on its last rank at update 3, then the same command as the requeued job."""
    bin_dir, pid_file, job_id = fake_scontrol(tmp_path / "bin"), tmp_path / "pid", 4242
    command = [*COMMAND, *extra, *await_signal(3, ntasks - 1, pid_file)]
    first = run_job(tmp_path, job_id, command, ntasks, bin_dir=bin_dir, send=signal_at(pid_file, signum))
    name = signal.Signals(signum).name
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}"
    for result in first:
        assert result.returncode == 2, result.stderr[-3000:]
    assert f"stopped by {name} after step" in first[0].stderr.strip().splitlines()[-1]
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 3 < stopped_at < MAX_STEPS
    assert json.loads((run_dir / "status.json").read_text())["status"] == "preempted"
    calls = (bin_dir / "scontrol.calls").read_text().splitlines() if (bin_dir / "scontrol.calls").exists() else []
    assert calls == ([] if signum == signal.SIGTERM else [f"requeue {job_id}"])  # once, by rank 0

    again = run_job(tmp_path, job_id, command, ntasks, restarts=1, bin_dir=bin_dir)
    for result in again:
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [f"slurm-{job_id}"]
    assert_joined_equals_straight(run_dir, straight)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, cache_dir) -> dict[int, Path]:
    """Uninterrupted references, by task count (made when first asked for)."""
    made: dict[int, Path] = {}

    def get(ntasks: int) -> Path:
        if ntasks not in made:
            cwd = tmp_path_factory.mktemp(f"straight{ntasks}")
            extra = DDP if ntasks > 1 else []
            results = run_job(cwd, 7, [*COMMAND, *extra, f"paths.cache_dir={cache_dir}"], ntasks)
            for result in results:
                assert result.returncode == 0, result.stderr[-3000:]
            made[ntasks] = cwd / "outputs" / "slurm-7"
        return made[ntasks]

    return get


def test_a_sigusr2_stops_a_slurm_job_which_requeued_continues_exactly(tmp_path, cache_dir, straight_runs):
    """One process: SIGUSR2 (what submitit's signal_delay_s asks SLURM for) kills it at once today, no checkpoint."""
    stop_and_requeue(tmp_path, straight_runs(1), signal.SIGUSR2, 1, [f"paths.cache_dir={cache_dir}"])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_other_stop_signals_on_one_process(tmp_path, cache_dir, straight_runs, signum):
    stop_and_requeue(tmp_path, straight_runs(1), signum, 1, [f"paths.cache_dir={cache_dir}"])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_one_of_two_ranks_stops_both_and_the_requeued_job_continues(
    tmp_path, cache_dir, straight_runs, signum
):
    """Rank 1 alone gets the signal; rank 0 requeues the job (it learns of the signal through the votes)."""
    stop_and_requeue(tmp_path, straight_runs(2), signum, 2, [*DDP, f"paths.cache_dir={cache_dir}"])
