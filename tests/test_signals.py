"""Jobs that outlive their allocation: a stop signal (SIGUSR2 from submitit's `signal_delay_s`, SIGUSR1, SIGTERM)
sent by another process to one rank of a SLURM job at a known update; every rank stops at one update boundary with
last.ckpt saved, the job is requeued (a fake `scontrol` records the call), and the byte-identical command run again
as the requeued job (same SLURM_JOB_ID, SLURM_RESTART_COUNT=1) continues: LR and loss per step equal an
uninterrupted run's. Each "task" is a process with the variables srun sets; ranks talk over gloo on localhost."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from protein_mlm.cli import continue_requeued_job, make_run_dir, prepare_run, requeued_argv
from protein_mlm.errors import ConfigError
from protein_mlm.preflight import check_config
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import trainer_plugins
from protein_mlm.training.agreement import VOTE_LAG, UpdateAgreement
from protein_mlm.training.stopping import REQUEUE_SIGNALS, STOP, STOP_SIGNALS, requeue
from tests.conftest import ROOT, TINY, compose_config
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
    cwd: Path,
    job_id: int,
    args: list[str],
    ntasks: int = 1,
    restarts: int = 0,
    bin_dir: Path | None = None,
    send=None,
    program: Path = ROOT / "train.py",
) -> list[subprocess.CompletedProcess]:
    """`srun python train.py ARGS` with `ntasks` tasks; `send(processes)` runs while they train. Each result's
    `ended` is when its process exited (time.monotonic)."""
    port, logs = free_port(), []
    tasks = []
    attempt = len(list(cwd.glob("task0-*.out")))  # a log per task and run of the job, beside the run dirs
    for rank in range(ntasks):
        logs.append((cwd / f"task{rank}-{attempt}.out", cwd / f"task{rank}-{attempt}.err"))
        with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
            env = slurm_env(job_id, rank, ntasks, restarts, port, bin_dir)
            command = [sys.executable, str(program), *args]
            tasks.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True))
    if send is not None:
        send(tasks)
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 600
    while len(ended) < ntasks and time.monotonic() < deadline:
        for rank, task in enumerate(tasks):
            if rank not in ended and task.poll() is not None:
                ended[rank] = time.monotonic()
        time.sleep(0.05)
    results = []
    for rank, (task, (out, err)) in enumerate(zip(tasks, logs, strict=True)):
        if task.poll() is None:
            task.kill()
        result = subprocess.CompletedProcess(task.args, task.wait(), out.read_text(), err.read_text())
        result.ended = ended.get(rank, math.inf)
        results.append(result)
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
@pytest.mark.parametrize("name", ["USR1", "TERM"])
def test_other_stop_signals_on_one_process(tmp_path, cache_dir, straight_runs, name):
    stop_and_requeue(tmp_path, straight_runs(1), signal.Signals[f"SIG{name}"], 1, [f"paths.cache_dir={cache_dir}"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["USR2", "USR1", "TERM"])
def test_a_signal_to_one_of_two_ranks_stops_both_and_the_requeued_job_continues(
    tmp_path, cache_dir, straight_runs, name
):
    """Rank 1 alone gets the signal; rank 0 requeues the job (it learns of the signal through the votes)."""
    signum = signal.Signals[f"SIG{name}"]
    stop_and_requeue(tmp_path, straight_runs(2), signum, 2, [*DDP, f"paths.cache_dir={cache_dir}"])


@pytest.mark.slow
def test_under_submitits_handlers_the_run_saves_first_then_submitit_requeues(tmp_path, cache_dir, straight_runs):
    """submitit installs its own SIGUSR2 handler (requeue and exit at once, nothing saved): ours runs instead, and
    submitit's is called after last.ckpt is written; the requeued job continues."""
    bin_dir, pid_file, job_id, folder = fake_scontrol(tmp_path / "bin"), tmp_path / "pid", 4545, tmp_path / "submitit"
    command = [str(folder), *COMMAND, f"paths.cache_dir={cache_dir}", *await_signal(3, 0, pid_file)]
    job = ROOT / "tests" / "submitit_job.py"
    first = run_job(tmp_path, job_id, command, bin_dir=bin_dir, send=signal_at(pid_file, signal.SIGUSR2), program=job)
    assert first[0].returncode == 255, first[0].stderr[-3000:]  # submitit's exit after its requeue
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}"
    assert 3 < torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] < MAX_STEPS
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and "stopped by SIGUSR2" in status["message"]
    assert (bin_dir / "scontrol.calls").read_text().splitlines() == [f"requeue {job_id}"]
    assert list(folder.glob("*_submitted.pkl"))  # submitit's checkpoint of the job, for the requeued one

    again = run_job(tmp_path, job_id, command, restarts=1, bin_dir=bin_dir, program=job)
    assert again[0].returncode == 0, again[0].stderr[-3000:]
    assert_joined_equals_straight(run_dir, straight_runs(1))


@pytest.mark.slow
def test_a_rank_failing_while_saving_stops_the_other_within_seconds(tmp_path, cache_dir):
    """Rank 1 raises while last.ckpt of update 2 is made; rank 0 would wait in Lightning's barrier after its write
    until the process group's timeout (30 min): both end within seconds instead."""
    failing = [
        "+callbacks.failing_save._target_=protein_mlm.training.debug.callbacks.FailingSave",
        "+callbacks.failing_save.at_step=2",
        "+callbacks.failing_save.rank=1",
        "callbacks.resume_checkpoint.every_n_train_steps=2",
    ]
    results = run_job(tmp_path, 4343, [*COMMAND, *DDP, *failing, f"paths.cache_dir={cache_dir}"], ntasks=2)
    assert all(result.returncode not in (0, None) for result in results), [r.stderr[-2000:] for r in results]
    assert "injected failure on rank 1" in results[1].stderr
    assert "other rank(s) failed while saving" in results[0].stderr
    assert abs(results[0].ended - results[1].ended) < 20


VOTES = st.lists(st.lists(st.sampled_from([None, *STOP_SIGNALS]), min_size=1, max_size=4), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(votes=VOTES, read_at=st.integers(0, 8))
def test_the_ranks_stop_for_a_requeue_signal_over_sigterm(votes, read_at):
    """Votes per update (one signal or none per rank), read VOTE_LAG updates later: any requeue signal wins, so rank
    0 requeues where any rank got one."""
    agreement = UpdateAgreement()
    for step, ranks in enumerate(votes):
        agreement._keep_vote(step, torch.tensor([float(sum(r == sig for r in ranks)) for sig in STOP_SIGNALS]))
    seen = {sig for ranks in votes[: max(0, read_at - VOTE_LAG + 1)] for sig in ranks if sig}
    expected = next((sig for sig in REQUEUE_SIGNALS if sig in seen), signal.SIGTERM if seen else None)
    assert agreement.stop_agreed(read_at) == expected


def slurm_job(monkeypatch, restarts: int | None, job_name: str = "pretrain") -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    if restarts is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))


def test_a_requeued_job_continues_only_from_its_own_last_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "slurm-77"
    command = ["model=tiny", f"hydra.run.dir={run_dir}"]
    slurm_job(monkeypatch, restarts=1)
    assert requeued_argv(command) == command  # nothing saved yet: the run starts
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeued_argv(command) == [f"resume={run_dir}"]
    assert make_run_dir(str(run_dir), explicit=True, reuse=True) == str(run_dir)
    cfg = OmegaConf.create({"paths": {"output_dir": str(run_dir)}, "ckpt_path": None})
    continue_requeued_job(cfg)
    assert cfg.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
    for restarts, name in ((0, "pretrain"), (None, "pretrain"), (2, "interactive")):  # first run; salloc shell
        slurm_job(monkeypatch, restarts, name)
        assert requeued_argv(command) == command
    with pytest.raises(ConfigError, match="already holds files"):  # outside a requeue: refused as before
        make_run_dir(str(run_dir), explicit=True)


def test_a_one_task_slurm_job_names_its_run_dir_by_its_job_id(tmp_path, monkeypatch):
    """A `${now}` dir would differ in the requeued job, which could then not find its checkpoint."""
    monkeypatch.chdir(tmp_path)
    slurm_job(monkeypatch, restarts=None)
    cfg, _ = prepare_run("train", ["model=tiny"], check_config)
    assert cfg.hydra.run.dir == "outputs/slurm-77" and (tmp_path / "outputs" / "slurm-77").is_dir()


def test_lightnings_slurm_auto_requeue_is_off(monkeypatch):
    slurm_job(monkeypatch, restarts=None)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    plugins = trainer_plugins(compose_config("model=tiny"))
    assert [p.auto_requeue for p in plugins if isinstance(p, SLURMEnvironment)] == [False]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "7")  # torchrun inside the job: Lightning's TorchElasticEnvironment
    assert not any(isinstance(p, SLURMEnvironment) for p in trainer_plugins(compose_config("model=tiny")))
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert not any(isinstance(p, SLURMEnvironment) for p in trainer_plugins(compose_config("model=tiny")))


def test_requeue_without_scontrol_is_a_warning(monkeypatch, tmp_path, caplog):
    slurm_job(monkeypatch, restarts=None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert requeue(signal.SIGUSR2) == "not requeued (no scontrol for job 77)"
    assert "no scontrol on PATH" in caplog.text
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path / "bin")))
    assert requeue(signal.SIGUSR2) == "requeued SLURM job 77"
    assert (tmp_path / "bin" / "scontrol.calls").read_text() == "requeue 77\n"


def test_stop_signals_are_caught_and_the_handlers_before_them_restored():
    """Without it SIGUSR1/2 end the process at once (exit 138/140); the handler found is kept for the requeue."""

    def submitit_like(signum, frame):
        raise AssertionError("called from the signal")

    submitit_like.__name__ = "checkpoint_and_try_requeue"
    before = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        STOP.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert STOP.signum == signal.SIGUSR2 and STOP.requeue and STOP.submitit_requeue() is submitit_like
        STOP.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is submitit_like
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before)
