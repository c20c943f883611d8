"""One data position for every mode: committed at update ends, saved by the loader, refused where a resume on
another machine would serve other records (docs/reliability.md, "The data position")."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from protein_mlm.data.loader import POSITION_KEY, ResumableLoader, StreamLoader
from protein_mlm.data.packing import PackedBatches
from protein_mlm.data.samplers import FixedSizeBatches, TokenBudgetBatchSampler
from protein_mlm.errors import ConfigError
from tests.conftest import run_cli
from tests.test_scale import RecordKeys, write_gz_fasta
from tests.test_stop_and_go import BASE, assert_same_run, interrupt_overrides, logged, trained_batches

TIMEOUT = 600  # seconds per train.py run: the slow tier may share a busy machine


def shards(small_fasta: list[str], folder: Path, count: int, layout: str) -> Path:
    """The small training FASTA cut into `count` FASTA or Parquet files, record k into file k % count."""
    train = Path(small_fasta[0].split("=", 1)[1])
    records = [">" + r for r in train.read_text().split(">") if r]
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        part = records[k::count]
        if layout == "fasta":
            (folder / f"part{k}.fasta").write_text("".join(part))
        else:
            sequences = ["".join(r.splitlines()[1:]) for r in part]
            pq.write_table(pa.table({"sequence": sequences}), folder / f"part{k}.parquet")
    return folder


def streaming_args(small_fasta: list[str], tmp_path: Path, max_steps: int, accumulate: int, layout: str) -> list:
    return [
        *BASE,
        *small_fasta[1:],
        f"data.train_path={shards(small_fasta, tmp_path / 'shards', 4, layout)}",
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


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fasta", "parquet"])
def test_a_stream_stopped_inside_an_accumulation_window_resumes_exactly(tmp_path, small_fasta, layout):
    """Issue #26 item 2: 4 shards, batch 4, accumulation 3, SIGTERM inside the validation after update 4, then at
    the 2nd micro-batch of update 5; a resume on another worker count is refused in one line (item 3), on the saved
    one the run equals the uninterrupted run."""
    max_steps = 7
    args = streaming_args(small_fasta, tmp_path, max_steps, accumulate=3, layout=layout)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path, timeout=TIMEOUT).returncode == 0
    legs = [
        [*args, f"hydra.run.dir={stopped}", *interrupt_overrides(("val", 4), "TERM", True)],
        [f"resume={stopped}", *interrupt_overrides((5, 1), "TERM", False)],
    ]
    for leg in legs:
        result = run_cli(*leg, cwd=tmp_path, timeout=TIMEOUT)
        assert result.returncode == 2 and "stopped by SIGTERM" in result.stderr, result.stderr[-2000:]
    if layout == "fasta":
        refused = run_cli(
            f"resume={stopped}", "callbacks.interrupt=null", "data.num_workers=2", cwd=tmp_path, timeout=TIMEOUT
        )
        assert "data.num_workers=0 was saved" in one_line_error(refused)
        assert "pass data.num_workers=0 to resume" in refused.stderr
    result = run_cli(f"resume={stopped}", "callbacks.interrupt=null", cwd=tmp_path, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((stopped / "status.json").read_text())["status"] == "completed"
    assert_same_stream(stopped, straight, max_steps)
    # The last leg's first micro-batch is the stopped window's first: update 5, micro-batch 0, batch 15.
    records = [json.loads(line) for line in (stopped / "batches.jsonl").read_text().splitlines()]
    restarts = [r for p, r in zip(records, records[1:]) if (r["step"], r["micro"]) <= (p["step"], p["micro"])]
    last = restarts[-1]  # a stop at a window boundary (after the validation) records nothing twice
    assert (last["step"], last["micro"], last["position"]) == (5, 0, [0, 15])


@pytest.mark.slow
@pytest.mark.parametrize("clustered", [False, True])
def test_a_map_style_run_continues_exactly_on_another_worker_count(tmp_path, small_fasta, clustered):
    """Token-budget batches (and cluster sampling: 30 clusters of 2): killed inside a window with no workers,
    resumed with data.num_workers=2, it trains what the uninterrupted run trains."""
    max_steps = 10 if clustered else 18
    args = [*BASE, *small_fasta, f"trainer.max_steps={max_steps}", "trainer.accumulate_grad_batches=2"]
    if clustered:
        train = Path(small_fasta[0].split("=", 1)[1])
        names = [line[1:].split()[0] for line in train.read_text().splitlines() if line.startswith(">")]
        mapping = tmp_path / "clusters.tsv"
        mapping.write_text("".join(f"C{i // 2}\t{name}\n" for i, name in enumerate(names)))
        args.append(f"data.cluster_map={mapping}")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path, timeout=TIMEOUT).returncode == 0
    first = run_cli(
        *args, f"hydra.run.dir={killed}", *interrupt_overrides((7, 1), "KILL", True), cwd=tmp_path, timeout=TIMEOUT
    )
    assert first.returncode == -9, first.stderr[-2000:]
    result = run_cli(
        f"resume={killed}", "callbacks.interrupt=null", "data.num_workers=2", cwd=tmp_path, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(killed, straight, max_steps)


# --- The position at the loader level: generated lengths, ranks, workers, accumulation and interruptions ---------


class Keys(Dataset):
    """A sample is its (epoch, index) key: what the loader asked for."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        return key


def key_batch(samples) -> dict:
    return {"keys": [tuple(int(v) for v in s) for s in samples]}


def map_loader(strategy: str, lengths: np.ndarray, world: int, rank: int, workers: int) -> ResumableLoader:
    shared = dict(num_replicas=world, rank=rank)
    batcher = {
        "fixed": lambda: FixedSizeBatches(len(lengths), 4, seed=3, **shared),
        "token_budget": lambda: TokenBudgetBatchSampler(lengths, 256, seed=3, **shared),
        "packed": lambda: PackedBatches(lengths, 2, 128, seed=3, **shared),
    }[strategy]()
    return ResumableLoader(Keys(len(lengths)), batcher, key_batch, workers, pin_memory=False)


def train(loader, micro_batches: int, accumulate: int, stop_at: int | None = None) -> list:
    """The keys of each micro-batch a training loop takes, committing each update's last one, until `micro_batches`
    (or an interruption before micro-batch `stop_at`: the open window is dropped, as the module drops it)."""
    taken = []
    for batch in loader:
        if len(taken) == (micro_batches if stop_at is None else stop_at):
            break
        taken.append(batch["keys"])
        if len(taken) % accumulate == 0:
            loader.commit(batch[POSITION_KEY])
    return taken if stop_at is None else taken[: stop_at - stop_at % accumulate]


def resumed_run(make, total: int, accumulate: int, stop_at: int, workers_after: int) -> list:
    """Keys trained by a run stopped before micro-batch `stop_at` and resumed from its saved position."""
    first = make(None)
    done = train(first, total, accumulate, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
    second = make(workers_after)
    second.load_state_dict(state)
    return done + train(second, total - len(done), accumulate)


lengths_strategy = st.lists(st.integers(1, 120), min_size=4, max_size=40).map(np.array)


def examples(count: int) -> settings:
    """A few generated cases in the fast tier, many in the slow one; worker processes make each one slow-ish."""
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# An interruption inside a validation is one at a window boundary here: validation reads its own loader.
MAP_INPUTS = dict(
    lengths=lengths_strategy,
    strategy=st.sampled_from(["fixed", "token_budget", "packed"]),
    world=st.integers(1, 3),
    workers=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    accumulate=st.integers(1, 3),
    data=st.data(),
)


def map_style_resumes_exactly_on_any_worker_count(lengths, strategy, world, workers, accumulate, data):
    """Stopped at any micro-batch (inside a window or at its end) and resumed on another worker count, each rank
    trains the uninterrupted run's batches; over the ranks every row is trained once per epoch, plus exactly the
    batches the rank split repeats (`samplers.rank_share`)."""
    total = len(map_loader(strategy, lengths, world, 0, 0).batcher.rank_batches(0)) * 2 + 1  # into epoch 2
    stop_at = data.draw(st.integers(0, total - 1), label="stop_at")
    served = []
    for rank in range(world):
        straight = train(map_loader(strategy, lengths, world, rank, 0), total, accumulate)

        def make(after, rank=rank):
            return map_loader(strategy, lengths, world, rank, workers[0] if after is None else after)

        assert resumed_run(make, total, accumulate, stop_at, workers[1]) == straight
        served += [key for batch in straight for key in batch]
    planner = map_loader(strategy, lengths, 1, 0, 0).batcher
    for epoch in (0, 1):
        plan = planner.batches(epoch)
        padding = range(len(plan), len(plan) + -len(plan) % world)  # positions past the end wrap (rank_share)
        repeats = [int(i) for position in padding for i in plan[position % len(plan)]]
        expected = sorted(list(range(len(lengths))) + repeats)
        assert sorted(index for e, index in served if e == epoch) == expected


def test_a_map_style_position_refuses_another_world_size():
    lengths = np.arange(1, 41)
    state = map_loader("token_budget", lengths, 2, 0, 0).state_dict()
    with pytest.raises(ConfigError, match="had 2 processes .* this one has 1: .*resume with 2 processes") as info:
        map_loader("token_budget", lengths, 1, 0, 0).load_state_dict(state)
    assert "\n" not in str(info.value)


def stream_loader(files: list[Path], world: int, rank: int, workers: int) -> StreamLoader:
    """Batches of 4 (epoch, record key) pairs of rank `rank`'s share of a streamed FASTA."""
    dataset = RecordKeys(files, 64, seed=0, rank=rank, world_size=world, num_workers=workers, shuffle_buffer=8)
    dataset.batch_size = 4
    return StreamLoader(DataLoader(dataset, batch_size=4, collate_fn=key_batch, num_workers=workers), world, workers)


STREAM_INPUTS = dict(
    shard_sizes=st.lists(st.integers(9, 14), min_size=1, max_size=3),
    world=st.integers(1, 3),
    workers=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    accumulate=st.integers(1, 3),
    data=st.data(),
)


def stream_resumes_exactly_on_its_readers_and_refuses_others(shard_sizes, world, workers, accumulate, data):
    """Stopped at any micro-batch and resumed: on the same readers (0 and 1 workers are one reader) each rank
    trains the uninterrupted run's batches, and each record once per reader epoch; on other readers, one line."""
    with tempfile.TemporaryDirectory() as folder:
        files, start = [], 0
        for k, size in enumerate(shard_sizes):
            files.append(
                write_gz_fasta(Path(folder) / f"s{k}.fa.gz", ["MKTAYIAKQR"[: 1 + i % 10] for i in range(size)], start)
            )
            start += size
        readers = max(workers[0], 1)
        total = readers * (-(-sum(shard_sizes) // 4) + 1)  # every reader passes its whole share of epoch 0
        stop_at = data.draw(st.integers(0, total - 1), label="stop_at")
        served = []
        for rank in range(world):
            straight = train(stream_loader(files, world, rank, workers[0]), total, accumulate)
            served += [pair for batch in straight for pair in batch]

            def make(after, rank=rank):
                return stream_loader(files, world, rank, workers[0] if after is None else after)

            if max(workers[1], 1) != readers:
                with pytest.raises(ConfigError, match=f"pass data.num_workers={workers[0]} to resume") as info:
                    resumed_run(make, total, accumulate, stop_at, workers[1])
                assert "\n" not in str(info.value)
                continue
            assert resumed_run(make, total, accumulate, stop_at, workers[1]) == straight
        assert len(served) == len(set(served))  # no record twice in one epoch
        first_keys = {key for epoch, key in served if epoch == 0}
        assert len(first_keys) == sum(shard_sizes)  # epoch 0 covers every record


test_a_map_style_run_resumes_exactly_on_any_worker_count = examples(6)(
    given(**MAP_INPUTS)(map_style_resumes_exactly_on_any_worker_count)
)
test_a_map_style_run_resumes_exactly_on_any_worker_count_many = pytest.mark.slow(
    examples(60)(given(**MAP_INPUTS)(map_style_resumes_exactly_on_any_worker_count))
)
test_a_stream_resumes_exactly_on_its_readers_and_refuses_others = examples(5)(
    given(**STREAM_INPUTS)(stream_resumes_exactly_on_its_readers_and_refuses_others)
)
test_a_stream_resumes_exactly_on_its_readers_and_refuses_others_many = pytest.mark.slow(
    examples(40)(given(**STREAM_INPUTS)(stream_resumes_exactly_on_its_readers_and_refuses_others))
)


def test_a_stream_position_refuses_another_world_size(tmp_path):
    files = [write_gz_fasta(tmp_path / "a.fa.gz", ["MKTAYIAKQR"] * 12)]
    state = stream_loader(files, 2, 0, 0).state_dict()
    with pytest.raises(ConfigError, match="had 2 processes .* this one has 1"):
        stream_loader(files, 1, 0, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="data.batch_size=8 was saved .* pass data.batch_size=8 to resume"):
        stream_loader(files, 2, 0, 0).load_state_dict({**state, "batch_size": 8})
    with pytest.raises(ConfigError, match="data.streaming must be what the run started with"):
        map_loader("fixed", np.arange(1, 9), 1, 0, 0).load_state_dict(stream_loader(files, 1, 0, 0).state_dict())
