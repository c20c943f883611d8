"""Stop and go: a run interrupted anywhere (kill -9 or SIGTERM; inside an accumulation window, at a window boundary,
inside a validation, in a later epoch) and resumed with `resume=` trains exactly what the uninterrupted run trains.

Each chain interrupts one run at every point in turn, resuming after each, and compares the whole run with an
uninterrupted reference: the content of every micro-batch (recorded by `debug.callbacks.BatchRecorder`), the LR at
every step, `train/loss`, `train/tokens_seen` and the steps at which `val/loss` was logged.
"""

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from protein_mlm.reporting.tblog import read_scalars
from tests.conftest import run_cli

# 60 training sequences of 1,024-token batches: 7 batches an epoch, so a dozen updates span several epochs.
BASE = [
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.val_check_interval=4",
    "trainer.num_sanity_val_steps=0",
    "data.max_length=128",
    "data.max_tokens=1024",
    "scheduler.warmup_steps=4",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.resume_checkpoint.every_n_train_steps=2",
    "print_config=false",
    "num_threads=1",  # a fixed thread count keeps CPU arithmetic identical between the runs
    "+callbacks.recorder._target_=protein_mlm.training.debug.callbacks.BatchRecorder",
    "+callbacks.recorder.path=${paths.output_dir}/batches.jsonl",
]

# (accumulate, max_steps, interruption points): (update, micro-batch) starts, or ("val", update) inside a validation.
CHAINS = {
    1: (18, [(3, 0), ("val", 8), (16, 0)]),  # boundary, validation, epoch 2 (batch 16)
    3: (10, [(2, 1), (4, 0), (6, 2), ("val", 8)]),  # window, boundary right after a validation, epoch 2, validation
}


def interrupt_overrides(point, signal_name: str, first: bool) -> list[str]:
    """Overrides that arm `debug.callbacks.Interrupt` at `point` (the first leg adds the callback)."""
    plus = "+" if first else ""
    in_validation = point[0] == "val"
    step, micro = (point[1], 0) if in_validation else point
    return [
        f"{plus}callbacks.interrupt._target_=protein_mlm.training.debug.callbacks.Interrupt",
        f"{plus}callbacks.interrupt.at_step={step}",
        f"{plus}callbacks.interrupt.micro_batch={micro}",
        f"{plus}callbacks.interrupt.in_validation={in_validation}",
        f"{plus}callbacks.interrupt.signal_name={signal_name}",
    ]


def run_chain(run_dir: Path, args: list[str], points: list, signal_name: str) -> None:
    """Start the run, interrupting it at each point in turn and resuming it, then let it finish."""
    expected = -signal.SIGKILL if signal_name == "KILL" else 2
    for leg, point in enumerate(points):
        if leg == 0:
            command = [*args, f"hydra.run.dir={run_dir}", *interrupt_overrides(point, signal_name, first=True)]
        else:
            command = [f"resume={run_dir}", *interrupt_overrides(point, signal_name, first=False)]
        result = run_cli(*command, cwd=run_dir.parent)
        assert result.returncode == expected, f"leg {leg} at {point}: {result.stderr[-3000:]}"
        if signal_name == "TERM":
            assert "stopped by SIGTERM" in result.stderr.strip().splitlines()[-1]
            assert json.loads((run_dir / "status.json").read_text())["status"] == "preempted"
    result = run_cli(f"resume={run_dir}", "callbacks.interrupt=null", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    # The original config stays; each resumed invocation's config is saved beside it.
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config-resume-1.yaml").is_file()
    assert list((run_dir / ".hydra").glob("resume-*/config.yaml"))


def trained_batches(run_dir: Path) -> dict[tuple[int, int], tuple[list[int], str]]:
    """{(update, micro-batch): (data position, digest)}; a batch trained again after a resume replaces the first."""
    records = [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]
    return {(r["step"], r["micro"]): (r["position"], r["digest"]) for r in records}


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}}; values logged again after a resume replace the earlier ones."""
    return {tag: dict(points) for tag, points in read_scalars(run_dir).items()}


def assert_same_run(resumed: Path, straight: Path, max_steps: int) -> None:
    batches, reference = trained_batches(resumed), trained_batches(straight)
    assert batches == reference
    assert max(position[0] for position, _ in reference.values()) >= 2  # the run reaches epoch 2
    ours, theirs = logged(resumed), logged(straight)
    assert ours["lr-inverse_sqrt"] == theirs["lr-inverse_sqrt"]
    assert sorted(ours["lr-inverse_sqrt"]) == list(range(max_steps))
    assert ours["train/tokens_seen"] == theirs["train/tokens_seen"]
    assert sorted(ours["train/loss"]) == list(range(max_steps))
    steps = range(max_steps)
    assert [ours["train/loss"][s] for s in steps] == pytest.approx([theirs["train/loss"][s] for s in steps], abs=1e-5)
    assert sorted(ours["val/loss"]) == sorted(theirs["val/loss"])
    assert [ours["val/loss"][s] for s in sorted(theirs["val/loss"])] == pytest.approx(
        [theirs["val/loss"][s] for s in sorted(theirs["val/loss"])], abs=1e-5
    )


@pytest.mark.slow  # about 90 s: a chain of stops and resumes through train.py
@pytest.mark.parametrize("accumulate", [1, 3])
def test_interrupted_runs_resume_exactly(tmp_path, small_fasta, accumulate):
    """kill -9 and SIGTERM chains (run side by side, one per core) against one uninterrupted run."""
    max_steps, points = CHAINS[accumulate]
    args = [*BASE, *small_fasta, f"trainer.max_steps={max_steps}", f"trainer.accumulate_grad_batches={accumulate}"]
    straight = tmp_path / "straight"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    with ThreadPoolExecutor(2) as pool:
        chains = {name: pool.submit(run_chain, tmp_path / name, args, points, name) for name in ("KILL", "TERM")}
        for future in chains.values():
            future.result()
    for name in chains:
        assert_same_run(tmp_path / name, straight, max_steps)
    checkpoints = sorted(p.name for p in (tmp_path / "KILL" / "checkpoints").iterdir())
    assert checkpoints[-1] == "last.ckpt" and len(checkpoints) == 2  # one best (save_top_k=1), one last, no -v1


@pytest.mark.slow
def test_resume_with_data_workers(tmp_path, small_fasta):
    """Two DataLoader worker processes: prefetching runs ahead, yet a resume continues at the trained position."""
    max_steps, _ = CHAINS[1]
    args = [*BASE, *small_fasta, f"trainer.max_steps={max_steps}"]
    straight = tmp_path / "straight"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    run_chain(tmp_path / "workers", [*args, "data.num_workers=2"], [(9, 0)], "KILL")
    assert_same_run(tmp_path / "workers", straight, max_steps)


@pytest.mark.slow
def test_packed_run_resumes_exactly(tmp_path, small_fasta):
    """data.packing=true, two micro-batches per update: kill -9 inside a window, inside a validation, in epoch 2."""
    max_steps = 12
    args = [
        *BASE,
        *small_fasta,
        "data.packing=true",
        f"trainer.max_steps={max_steps}",
        "trainer.accumulate_grad_batches=2",
    ]
    straight = tmp_path / "straight"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    run_chain(tmp_path / "packed", args, [(2, 1), ("val", 4), (9, 1)], "KILL")
    assert_same_run(tmp_path / "packed", straight, max_steps)


def test_a_full_disk_mid_run_is_one_line_and_loses_no_checkpoint(tmp_path, small_fasta):
    import torch

    run_dir = tmp_path / "run"
    full_disk = ["+callbacks.disk._target_=protein_mlm.training.debug.callbacks.DiskFull", "+callbacks.disk.at_step=5"]
    result = run_cli(*BASE, *small_fasta, "trainer.max_steps=12", *full_disk, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write") and "No space left on device" in last_line
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # the earlier one
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # no partial file left
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_fixed_size_run_resumes_exactly(tmp_path, small_fasta):
    """data.max_tokens=null (batches of data.batch_size): kill -9 at a window boundary and in epoch 2."""
    max_steps = 18
    args = [*BASE, *small_fasta, "data.max_tokens=null", "data.batch_size=8", f"trainer.max_steps={max_steps}"]
    straight = tmp_path / "straight"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    run_chain(tmp_path / "fixed", args, [(3, 0), (16, 0)], "KILL")
    assert_same_run(tmp_path / "fixed", straight, max_steps)
