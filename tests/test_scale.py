"""Scaling: chunked preprocessing equals the in-memory one, rank-sharded samplers, streaming FASTA, DDP, FSDP."""

import functools
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from protein_mlm.alphabet import encode_residues
from protein_mlm.data.datamodule import MaskedSequenceDataset
from protein_mlm.data.fasta import read_fasta
from protein_mlm.data.masking import IGNORE_INDEX
from protein_mlm.data.preprocess import BUNDLED_FASTA, build_splits, decode_ids, is_val_sequence
from protein_mlm.data.samplers import EpochSampler, TokenBudgetBatchSampler
from protein_mlm.data.streaming import StreamingFastaDataset
from protein_mlm.errors import ConfigError
from protein_mlm.preflight import check_config
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import build_datamodule, train

from .conftest import TINY, compose_config, run_cli


def reference_splits(train_path: Path, val_path: Path | None, val_fraction: float):
    """The in-memory preprocessing this project had before it was made to scale (kept here as the oracle)."""

    def unique(path):
        seen, out, total, empty = set(), [], 0, 0
        for _, residues in read_fasta(path):
            total += 1
            if not residues:
                empty += 1
            elif residues not in seen:
                seen.add(residues)
                out.append(residues)
        return out, total - empty - len(out), empty

    train, duplicates, empty = unique(train_path)
    overlap = 0
    if val_path is None:
        val = [s for s in train if is_val_sequence(s, val_fraction)]
        train = [s for s in train if not is_val_sequence(s, val_fraction)]
    else:
        val = unique(val_path)[0]
        kept = [s for s in train if s not in set(val)]
        overlap, train = len(train) - len(kept), kept
    ids = lambda seqs: [encode_residues(s).tolist() for s in seqs]  # noqa: E731
    return {"train": ids(train), "val": ids(val)}, (len(train), len(val), duplicates, empty, overlap)


def as_tuple(stats):
    return (
        stats.train_sequences,
        stats.val_sequences,
        stats.duplicates_removed,
        stats.empty_removed,
        stats.val_overlap_removed,
    )


def test_chunked_preprocessing_gives_the_same_ids_in_the_same_order(tmp_path, monkeypatch):
    bundled = Path(str(BUNDLED_FASTA))
    expected, expected_stats = reference_splits(bundled, None, 0.03)
    monkeypatch.setattr("protein_mlm.data.preprocess.CHUNK_RECORDS", 777)  # several chunks, a partial last one
    splits, stats = build_splits(bundled, None, 0.03, out_dir=tmp_path / "bundled")
    assert as_tuple(stats) == expected_stats
    for name in ("train", "val"):
        assert splits[name]["input_ids"] == expected[name]

    # Duplicates, empty records, lower case and a separate validation file that overlaps train.
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWYX"), rng.integers(1, 90))) for _ in range(3000)]
    records = seqs + seqs[::7] + [s.lower() for s in seqs[::11]] + [""] * 5
    order = rng.permutation(len(records))
    train = tmp_path / "t.fasta.gz"
    train.write_bytes(gzip.compress("".join(f">r{i}\n{records[i]}\n" for i in order).encode()))
    val = tmp_path / "v.fasta"
    val.write_text("".join(f">v{i}\n{s}\n" for i, s in enumerate(seqs[5:300:3] + ["MKV", "MKV"])))
    for val_path in (None, val):  # 777-record chunks: duplicates across chunks and within one
        expected, expected_stats = reference_splits(train, val_path, 0.1)
        splits, stats = build_splits(train, val_path, 0.1)
        assert as_tuple(stats) == expected_stats
        assert stats.duplicates_removed > 0 and stats.empty_removed == 5
        for name in ("train", "val"):
            assert splits[name]["input_ids"] == expected[name]
        assert splits["train"].features["input_ids"].feature.dtype == "uint8"


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_equal_shares_of_each_epoch(world):
    lengths = np.random.default_rng(0).integers(10, 300, size=1001)
    single = TokenBudgetBatchSampler(lengths, max_tokens=1024, seed=0)
    for epoch in (0, 1):
        shares = []
        for rank in range(world):
            sampler = TokenBudgetBatchSampler(lengths, max_tokens=1024, seed=0, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            shares.append([[i for _, i in batch] for batch in sampler])
            assert len(shares[-1]) == len(sampler)
        assert len({len(share) for share in shares}) == 1  # every rank steps the same number of times
        single.set_epoch(epoch)
        batches = [[i for _, i in b] for b in single]
        # Rank r serves batches r, r + W, ... of the single-process epoch; the tail is padded by repeating its start.
        padded = batches + batches[: -len(batches) % world]
        for rank in range(world):
            assert shares[rank] == padded[rank::world]
        served = [i for share in shares for batch in share for i in batch]
        assert sorted(set(served)) == list(range(1001))

        samplers = [EpochSampler(1001, seed=0, num_replicas=world, rank=r) for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        orders = [[i for _, i in sampler] for sampler in samplers]
        assert len({len(order) for order in orders}) == 1 == len({len(s) for s in samplers})
        assert sorted(set(sum(orders, []))) == list(range(1001))
        assert sum(map(len, orders)) - 1001 == -1001 % world  # only the padding repeats


def test_validation_shards_pad_with_weightless_samples(cache_dir):
    from protein_mlm.data.datamodule import ProteinDataModule

    dm = ProteinDataModule(max_length=64, max_tokens=512, cache_dir=str(cache_dir))
    dm.setup()
    dataset = MaskedSequenceDataset(dm.splits["val"], 64, seed=0)
    lengths = dm.token_lengths("val")
    for make in (
        lambda r: TokenBudgetBatchSampler(lengths, 512, 0, shuffle=False, fixed=True, num_replicas=3, rank=r),
        lambda r: EpochSampler(len(lengths), 0, shuffle=False, fixed=True, num_replicas=3, rank=r),
    ):
        served, padding = [], []
        for rank in range(3):
            for item in make(rank):
                for _, index in item if isinstance(item, list) else [item]:
                    (served if index >= 0 else padding).append(index)
        assert sorted(served) == list(range(len(lengths)))  # every validation sample exactly once
        for index in padding:
            ids, labels = dataset[0, index]
            assert (labels == IGNORE_INDEX).all() and len(ids) > 2


class RecordShards(pl.Callback):
    """Test helper, instantiated in every DDP process: writes the indices its samplers serve in epoch 0."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, pl_module):
        train_sampler = trainer.train_dataloader.batcher
        val_sampler = trainer.val_dataloaders.batch_sampler
        record = {
            "world_size": trainer.world_size,
            "num_batches": len(train_sampler.rank_batches(0)),
            "train": [[int(i) for i in batch] for batch in train_sampler.rank_batches(0)],
            "train_total_batches": len(train_sampler.batches(0)),
            "train_samples": len(train_sampler.lengths),
            "val": [int(i) for batch in val_sampler.rank_batches(0) for i in batch],
            "pid": os.getpid(),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_two_cpu_processes_share_epochs_and_follow_the_single_process_lr(tiny_cfg, cache_dir, tmp_path):
    """trainer=ddp with 2 gloo processes: disjoint shards, one run dir, the single-process LR at every step."""
    record_dir = tmp_path / "shards"
    record_dir.mkdir()
    run_dir = tmp_path / "ddp"
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    result = run_cli(
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "num_threads=1",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.record_shards._target_=tests.test_scale.RecordShards",
        f"+callbacks.record_shards.out_dir={record_dir}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["num_batches"] == ranks[1]["num_batches"]
    batches0, batches1 = ranks[0]["train"], ranks[1]["train"]
    if ranks[0]["train_total_batches"] % 2:  # an odd batch count: rank 1 pads with the epoch's first batch
        assert batches1[-1] == batches0[0]
        batches1 = batches1[:-1]
    train0, train1 = {i for b in batches0 for i in b}, {i for b in batches1 for i in b}
    assert not train0 & train1  # disjoint, apart from that padding
    assert sum(map(len, batches0 + batches1)) == len(train0 | train1)  # no sample twice within a rank either
    assert train0 | train1 == set(range(ranks[0]["train_samples"]))  # together they cover the epoch
    val = sorted(i for r in ranks for i in r["val"] if i >= 0)  # negative: weightless padding
    assert val == list(range(len(val)))  # every validation sample once, on one rank

    # One run dir, written by rank 0 only; rank 1 logged to its own file in it.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()].count("ddp") == 1
    assert not list(tmp_path.glob("outputs"))
    assert (run_dir / "status.json").is_file() and not list(run_dir.glob("config-resume-*.yaml"))
    assert (run_dir / "train.log").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert len(list((run_dir).rglob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("val/perplexity") == 1  # one summary line

    cfg = tiny_cfg("num_threads=1")
    train(cfg)
    single = read_scalars(Path(cfg.paths.output_dir))["lr-inverse_sqrt"]
    ddp = read_scalars(run_dir)["lr-inverse_sqrt"]
    assert ddp == single and [s for s, _ in ddp] == list(range(12))


class RecordKeys(StreamingFastaDataset):
    """The stream's (epoch, record key) pairs instead of masked samples."""

    def __iter__(self):
        for epoch, key, _ in self.records():
            yield epoch, key


def write_gz_fasta(path: Path, records: list[str], start: int = 0) -> Path:
    path.write_bytes(gzip.compress("".join(f">r{start + i}\n{s}\n" for i, s in enumerate(records)).encode()))
    return path


@pytest.mark.parametrize("layout", ["one_gzip", "three_shards"])
def test_streaming_yields_every_record_once_per_epoch_across_workers_and_ranks(tmp_path, layout):
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(5, 40))) for _ in range(601)]
    if layout == "one_gzip":
        files = [write_gz_fasta(tmp_path / "all.fasta.gz", seqs)]
    else:
        files = [write_gz_fasta(tmp_path / f"s{k}.fa.gz", seqs[k::3]) for k in range(3)]
    for world in (1, 2):
        seen = []
        for rank in range(world):
            stream = RecordKeys(
                files, 64, seed=0, rank=rank, world_size=world, num_workers=2, shuffle_buffer=50, epochs=2
            )
            seen += [(int(e), int(k)) for e, k in DataLoader(stream, batch_size=None, num_workers=2)]
        assert len(seen) == len(set(seen)) == 2 * 601  # every record exactly once in each of two epochs
        first = [k for e, k in seen if e == 0]
        assert first != [k for e, k in seen if e == 1]  # reshuffled per epoch


def test_streaming_resume_skips_exactly_the_batches_trained(tmp_path):
    path = write_gz_fasta(tmp_path / "a.fasta.gz", ["MKTAYIAKQR"[: 1 + i % 10] for i in range(200)])
    for workers in (0, 1, 2, 3):
        stream = RecordKeys([path], 64, seed=0, num_workers=workers, shuffle_buffer=20, epochs=1)
        full = [batch[1].tolist() for batch in DataLoader(stream, batch_size=4, num_workers=workers)]
        stream.skip_batches, stream.batch_size = 7, 4
        resumed = [batch[1].tolist() for batch in DataLoader(stream, batch_size=4, num_workers=workers)]
        assert resumed == full[7:], workers  # exactly after the 7 batches trained, whichever worker served them


def served_pairs(stream, skip: int = 0) -> list[list[tuple[int, int]]]:
    """The (epoch, key) pairs of each batch a 2-worker DataLoader serves after skipping `skip` batches."""
    stream.skip_batches, stream.batch_size = skip, 4
    loader = DataLoader(stream, batch_size=4, num_workers=2)
    return [list(zip(epochs.tolist(), keys.tolist(), strict=True)) for epochs, keys in loader]


@pytest.mark.parametrize("trained", [7, 10, 37])
def test_streaming_resume_serves_every_record_once_per_epoch_on_two_ranks_with_two_workers(tmp_path, trained):
    """Interrupted after `trained` batches on each of 2 ranks (2 workers each) and resumed: the batches after the
    interruption are those of the uninterrupted run, so each record is trained once per epoch, epoch after epoch."""
    path = write_gz_fasta(tmp_path / "a.fasta.gz", [("MKTAYIAKQR" * 3)[: 5 + i % 20] for i in range(203)])
    served = []
    for rank in (0, 1):
        make = functools.partial(
            RecordKeys, [path], 64, seed=0, rank=rank, world_size=2, num_workers=2, shuffle_buffer=16, epochs=2
        )
        full = served_pairs(make())
        resumed = served_pairs(make(), skip=trained)
        assert resumed == full[trained:]
        served += [pair for batch in full[:trained] + resumed for pair in batch]
    assert len(served) == len(set(served)) == 2 * 203  # both epochs, every record once, over both ranks


def test_streaming_run_and_its_option_errors(tiny_cfg, tmp_path):
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(20, 80))) for _ in range(300)]
    train_file = write_gz_fasta(tmp_path / "train.fasta.gz", seqs)
    val_file = write_gz_fasta(tmp_path / "val.fasta.gz", seqs[:30])  # also in train: must not be trained on
    streaming = ["data.streaming=true", f"data.train_path={train_file}", "data.max_tokens=null", "data.batch_size=8"]
    with pytest.raises(ConfigError, match="needs data.val_path"):
        check_config(tiny_cfg(*streaming))
    with pytest.raises(ConfigError, match="cannot honour data.max_tokens"):
        check_config(tiny_cfg(*streaming, f"data.val_path={val_file}", "data.max_tokens=512"))

    cfg = tiny_cfg(*streaming, f"data.val_path={val_file}", "data.num_workers=2")
    dm = build_datamodule(cfg, check_config(cfg))
    dm.setup()
    val = {decode_ids(ids) for ids in dm.splits["val"].with_format("numpy")["input_ids"]}
    assert len(val) == 30
    stream = dm._streaming_loader(None).dataset
    stream.epochs = 1
    trained = sorted(key for _, key, _ in stream.records())
    assert trained == list(range(30, 300))  # the 30 validation sequences are left out of training
    metrics = train(cfg)
    assert metrics["steps"] == 12 and np.isfinite(metrics["val/loss"])


@pytest.mark.parametrize("experiment", ["esm2_650m", "esm2_3b"])
def test_fsdp_config_composes_for_the_big_presets(experiment, tmp_path):
    """Lightning's FSDP refuses the CPU, so here the config is composed and its strategy built, not run."""
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.esm.modeling_esm import EsmLayer

    from protein_mlm.plan import accumulation_steps

    cfg = compose_config(f"experiment={experiment}", "trainer=fsdp", "trainer.strategy.activation_checkpointing=true")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name == "FULL_SHARD"
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {EsmLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {EsmLayer}
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 8
    assert accumulation_steps(cfg) == 16  # 2^21 tokens per update / (16,384 tokens x 8 GPUs)
    with pytest.raises(ConfigError, match="needs GPUs"):
        check_config(compose_config(f"experiment={experiment}", "trainer=fsdp", "trainer.accelerator=cpu"))


def test_slurm_experiment_sizes_the_job_from_the_trainer():
    from protein_mlm.cli import check_multirun_processes, compose_checked
    from protein_mlm.plan import accumulation_steps

    cfg = compose_checked(
        "train", ["experiment=slurm_multinode", "trainer.num_nodes=4", "hydra.launcher.partition=gpu"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy") and cfg.model.name == "esm2_650m"
    assert accumulation_steps(cfg) == 4  # 2^21 tokens per update / (16,384 tokens x 8 GPUs x 4 nodes)
    cfg = compose_checked("train", ["experiment=slurm_multinode", "model=esm2_3b", "trainer=fsdp"])
    assert cfg.trainer.strategy._target_ == "protein_mlm.model.parallel.fsdp_strategy" and cfg.trainer.num_nodes == 2
    check_config(cfg)  # no GPU needed to submit
    check_multirun_processes(cfg)  # SLURM starts every process itself: several per job are fine


def test_memory_formula():
    from protein_mlm.model.esm import build_model, count_parameters
    from protein_mlm.model.memory import training_bytes

    cfg = compose_config("model=esm2_650m")
    params = count_parameters(build_model(OmegaConf.to_container(cfg.model.architecture), device="meta"))
    sharded, _ = training_bytes(params, layers=1, hidden=1, tokens=1, shards=8)
    assert sharded == pytest.approx(16 * params / 8)
    assert training_bytes(params, layers=1, hidden=1, tokens=1)[0] == 16 * params


def test_a_local_multirun_of_ddp_jobs_is_a_one_line_error(tmp_path):
    result = run_cli("-m", "trainer=ddp", "trainer.devices=2", "scheduler.warmup_steps=1,2", cwd=tmp_path)
    assert result.returncode == 2 and "cannot run on this launcher" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "multirun").exists()
