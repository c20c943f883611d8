"""Many epochs through a real `Trainer.fit` (nobody calls `set_epoch` by hand): epoch e serves the batches its
sampler computes for epoch e, new ones every epoch, for every batching mode, with cluster sampling and on 2 ranks."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from protein_mlm.data.masking import collate
from protein_mlm.preflight import check_config
from protein_mlm.train import build_datamodule, train
from protein_mlm.training.debug.callbacks import batch_digest
from tests.conftest import TINY, compose_config, run_cli

RUN = [
    "trainer.max_steps=24",
    "trainer.val_check_interval=1000",
    "data.max_length=128",
    "data.max_tokens=1024",
    "callbacks.resume_checkpoint.every_n_train_steps=1000",
    "+callbacks.recorder._target_=protein_mlm.training.debug.callbacks.BatchRecorder",
    "+callbacks.recorder.path=${paths.output_dir}/batches.jsonl",
]


def train_small(tmp_path: Path, small_fasta: list[str], *overrides: str):
    cfg = compose_config(*TINY, *small_fasta, *RUN, *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    return cfg


def served(run_dir: Path, name: str = "batches.jsonl") -> dict[int, list[tuple[int, str]]]:
    """{epoch: [(batch index, digest), ...]} in the order the run trained them."""
    epochs: dict[int, list[tuple[int, str]]] = {}
    for line in (run_dir / name).read_text().splitlines():
        record = json.loads(line)
        epoch, batch = record["position"]
        epochs.setdefault(epoch, []).append((batch, record["digest"]))
    return epochs


def sampler_batches(cfg, world: int = 1, rank: int = 0):
    """(the DataModule, this rank's batcher) built from the config alone, outside any Trainer."""
    datamodule = build_datamodule(cfg, check_config(cfg))
    datamodule.setup()
    datamodule.replicas = lambda: (world, rank)
    return datamodule, datamodule._batcher("train", shuffle=True)


def check_epochs(cfg, epochs, world: int = 1, rank: int = 0, min_epochs: int = 3) -> list[list[int]]:
    """Each served batch equals the sampler's own batch for that epoch; epochs differ; returns complete epochs' rows."""
    datamodule, batcher = sampler_batches(cfg, world, rank)
    dataset = datamodule._dataset("train")
    complete = []
    for epoch, batches in epochs.items():
        expected = batcher.rank_batches(epoch)
        for index, digest in batches:
            assert digest == batch_digest(collate([dataset[epoch, int(i)] for i in expected[index]])), (epoch, index)
        if [i for i, _ in batches] == list(range(len(expected))):
            complete.append([int(i) for batch in expected for i in batch])
    assert len(complete) >= min_epochs
    for epoch in range(1, len(epochs)):
        assert [d for _, d in epochs[epoch]] != [d for _, d in epochs[epoch - 1]][: len(epochs[epoch])]
    return complete


def test_token_budget_batches_change_every_epoch(tmp_path, small_fasta):
    cfg = train_small(tmp_path, small_fasta)
    for rows in check_epochs(cfg, served(tmp_path / "run")):
        assert sorted(rows) == list(range(60))  # every sequence once per epoch


def test_fixed_size_batches_change_every_epoch(tmp_path, small_fasta):
    cfg = train_small(tmp_path, small_fasta, "data.max_tokens=null", "data.batch_size=8")
    for rows in check_epochs(cfg, served(tmp_path / "run")):
        assert sorted(rows) == list(range(60))


def test_cluster_sampling_visits_every_cluster_once_per_epoch(tmp_path, small_fasta):
    ids = [line[1:].split()[0] for line in Path(small_fasta[0].split("=", 1)[1]).read_text().splitlines()[::2]]
    cluster_map = tmp_path / "clusters.tsv"
    cluster_map.write_text("".join(f"C{i // 3}\t{record}\n" for i, record in enumerate(ids)))  # 20 clusters of 3
    cfg = train_small(tmp_path, small_fasta, f"data.cluster_map={cluster_map}")
    datamodule, _ = sampler_batches(cfg)
    clusters = datamodule.clusters
    cluster_of = np.repeat(np.arange(len(clusters)), np.diff(clusters.offsets))[np.argsort(clusters.members)]
    complete = check_epochs(cfg, served(tmp_path / "run"), min_epochs=5)
    for rows in complete:
        assert sorted(cluster_of[rows]) == list(range(20))  # each cluster exactly once
    assert len({tuple(sorted(rows)) for rows in complete}) > 1  # different members in different epochs


@pytest.mark.slow
def test_two_ddp_ranks_serve_their_share_of_every_epoch(tmp_path, small_fasta):
    run_dir = tmp_path / "ddp"
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    result = run_cli(
        *overrides, *small_fasta, *RUN, "trainer.max_steps=12", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "num_threads=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = compose_config(*TINY, *small_fasta, *RUN)
    shares = [check_epochs(cfg, served(run_dir, f"batches.rank{r}.jsonl"), world=2, rank=r) for r in (0, 1)]
    for rows0, rows1 in zip(*shares):
        assert set(range(60)) <= set(rows0) | set(rows1)  # together the ranks cover the epoch
