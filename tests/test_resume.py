"""Crash and preemption: kill -9 then resume= reproduces the uninterrupted run; SIGTERM saves a checkpoint."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protein_mlm.tblog import read_scalars
from tests.conftest import ROOT, TINY, run_cli

RUN = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))] + [
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "callbacks.last_checkpoint.every_n_train_steps=3",
    "num_threads=1",  # a fixed thread count keeps CPU arithmetic identical between the runs
]


def per_step(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value}; after a resume the re-trained steps are logged again and the later value wins."""
    return dict(read_scalars(run_dir / "tensorboard")[tag])


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    cache = f"paths.cache_dir={tmp_path}/cache"
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_cli(*RUN, cache, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0

    killed = run_cli(*RUN, cache, f"hydra.run.dir={crashed}", "faults.kill_at_step=8", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    last = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)  # loadable after kill -9
    assert last["global_step"] == 6

    resumed = run_cli(f"resume={crashed}", "faults.kill_at_step=null", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((crashed / "status.json").read_text())["steps"] == 12

    lr_straight, lr_resumed = per_step(straight, "lr-inverse_sqrt"), per_step(crashed, "lr-inverse_sqrt")
    assert sorted(lr_resumed) == list(range(12)) and lr_resumed == lr_straight
    loss_straight, loss_resumed = per_step(straight, "train/loss"), per_step(crashed, "train/loss")
    assert sorted(loss_resumed) == list(range(12))
    assert [loss_resumed[s] for s in range(12)] == pytest.approx([loss_straight[s] for s in range(12)], abs=1e-5)
    # The original config stays; the resumed invocation's config is saved beside it.
    assert (crashed / "config.yaml").is_file() and (crashed / "config-resume-1.yaml").is_file()
    assert list((crashed / ".hydra").glob("resume-*/config.yaml"))


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, "trainer.max_steps=100000", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not list((run_dir / "tensorboard").glob("events*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # some steps in
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "stopped by SIGTERM after step" in stderr.decode().strip().splitlines()[-1]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step > 0
    resumed = run_cli(f"resume={run_dir}", f"trainer.max_steps={step + 2}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["steps"] == step + 2
