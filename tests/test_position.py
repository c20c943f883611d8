"""One data position for every mode: committed at update ends, saved by the loader, refused where a resume on
another machine would serve other records (docs/reliability.md, "The data position")."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_stop_and_go import BASE, interrupt_overrides, logged, trained_batches


def fasta_shards(small_fasta: list[str], folder: Path, shards: int) -> Path:
    """The small training FASTA cut into `shards` files, record k into file k % shards."""
    train = Path(small_fasta[0].split("=", 1)[1])
    records = [">" + r for r in train.read_text().split(">") if r]
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        (folder / f"part{k}.fasta").write_text("".join(records[k::shards]))
    return folder


def streaming_args(small_fasta: list[str], tmp_path: Path, max_steps: int, accumulate: int) -> list[str]:
    shards = fasta_shards(small_fasta, tmp_path / "shards", 4)
    return [
        *BASE,
        *small_fasta[1:],
        f"data.train_path={shards}",
        "data.streaming=true",
        "data.max_tokens=null",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        f"trainer.max_steps={max_steps}",
        f"trainer.accumulate_grad_batches={accumulate}",
    ]


def assert_same_stream(resumed: Path, straight: Path, max_steps: int) -> None:
    """Every micro-batch's content, train/loss and train/tokens_seen as in the uninterrupted run."""
    batches, reference = trained_batches(resumed), trained_batches(straight)
    assert batches == reference and len(reference) > 0
    ours, theirs = logged(resumed), logged(straight)
    assert ours["train/tokens_seen"] == theirs["train/tokens_seen"]
    steps = range(max_steps)
    assert [ours["train/loss"][s] for s in steps] == pytest.approx([theirs["train/loss"][s] for s in steps], abs=1e-5)


def test_a_stream_stopped_inside_an_accumulation_window_resumes_exactly(tmp_path, small_fasta):
    """Issue #26 item 2: 4 FASTA shards, batch 4, accumulation 3, SIGTERM at the 2nd micro-batch of update 5."""
    max_steps = 7
    args = streaming_args(small_fasta, tmp_path, max_steps, accumulate=3)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    first = run_cli(*args, f"hydra.run.dir={stopped}", *interrupt_overrides((5, 1), "TERM", True), cwd=tmp_path)
    assert first.returncode == 2 and "stopped by SIGTERM" in first.stderr, first.stderr[-2000:]
    result = run_cli(f"resume={stopped}", "callbacks.interrupt=null", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((stopped / "status.json").read_text())["status"] == "completed"
    assert_same_stream(stopped, straight, max_steps)
    # The resumed leg's first micro-batch is the stopped window's first: update 5, micro-batch 0, batch 15.
    records = [json.loads(line) for line in (stopped / "batches.jsonl").read_text().splitlines()]
    resumed_from = next(r for p, r in zip(records, records[1:]) if (r["step"], r["micro"]) <= (p["step"], p["micro"]))
    assert (resumed_from["step"], resumed_from["micro"], resumed_from["position"]) == (5, 0, [0, 15])
