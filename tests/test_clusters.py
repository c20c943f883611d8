"""UniRef cluster sampling: one member per cluster per epoch, uniform, deterministic; mapping files and their errors."""

import gzip
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from protein_mlm.data import clusters
from protein_mlm.data.clusters import cluster_arrays, match_records, read_cluster_table, row_record_ids
from protein_mlm.data.datamodule import ProteinDataModule
from protein_mlm.errors import DataError

# Upper 0.1% points of the chi-square distribution (standard tables), for the degrees of freedom used below.
CHI2_CRITICAL_0_001 = {19: 43.820, 40: 73.402}
SIZES = [1, 2, 3, 4, 5] * 4  # 20 clusters of 1-5 members: 20 - 1 and sum(k - 1) = 40 degrees of freedom


def uniref_data(tmp_path: Path, sizes=SIZES, seed: int = 0) -> tuple[Path, Path, dict[str, str]]:
    """A UniRef90-style FASTA and a UniRef50 cluster<TAB>member map; returns (fasta, map, member -> cluster)."""
    rng = np.random.default_rng(seed)
    records, lines, cluster_of = [], [], {}
    for c, size in enumerate(sizes):
        for m in range(size):
            member = f"UniRef90_C{c}M{m}"
            residues = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(20, 60))))
            records.append(f">{member} Some protein n=2 Tax=Homo sapiens RepID=C{c}M{m}\n{residues}\n")
            lines.append(f"UniRef50_C{c}\t{member}\n")
            cluster_of[member] = f"UniRef50_C{c}"
    fasta, mapping = tmp_path / "uniref90.fasta", tmp_path / "uniref50.tsv"
    fasta.write_text("".join(records))
    mapping.write_text("".join(lines))
    return fasta, mapping, cluster_of


def datamodule(tmp_path: Path, fasta: Path, cluster_map: Path | None, seed: int = 0) -> ProteinDataModule:
    val = tmp_path / "val.fasta"
    if not val.exists():  # a separate validation file keeps every synthetic sequence in train
        val.write_text(">val\nWWWWWWWWWWYYYY\n")
    dm = ProteinDataModule(
        train_path=str(fasta),
        val_path=str(val),
        max_length=64,
        max_tokens=512,
        seed=seed,
        cache_dir=str(tmp_path / "cache"),
        cluster_map=str(cluster_map) if cluster_map else None,
    )
    dm.setup()
    return dm


def ids_per_row(path: Path, sequences) -> list[list[str]]:
    """The record ids each row of a split stands for, from the (id, row) table."""
    ids: list[list[str]] = [[] for _ in range(len(sequences))]
    table = pa.concat_tables(row_record_ids(path, sequences))
    for record_id, row in zip(table["id"].to_pylist(), table["row"].to_pylist()):
        ids[row].append(record_id)
    return ids


def read_cluster_map(path: Path, wanted: set[str] | None = None) -> tuple[dict[str, list[str]], int]:
    """({cluster: [members in file order, once each]}, clusters in the file), from the Arrow table; the members
    (or `wanted`) matched as record ids, which checks that each is in one cluster."""
    table = read_cluster_table(path)
    members = sorted(wanted) if wanted is not None else sorted(set(table["member"].to_pylist()))
    _, _, in_file = match_records(path, pa.table({"id": pa.array(members, pa.string())}))
    clusters: dict[str, dict[str, None]] = {}
    for cluster, member in zip(table["cluster"].to_pylist(), table["member"].to_pylist()):
        if wanted is None or member in wanted:
            clusters.setdefault(cluster, {})[member] = None
    return {cluster: list(members) for cluster, members in clusters.items()}, in_file


def served_rows(dm: ProteinDataModule, epoch: int) -> list[int]:
    """The training rows the DataModule's sampler serves in one epoch."""
    return [int(index) for batch in dm.train_dataloader().batcher.rank_batches(epoch) for index in batch]


def row_clusters(dm: ProteinDataModule, cluster_of: dict[str, str]) -> list[str]:
    ids = ids_per_row(dm.train_path, dm.splits["train"])
    return [cluster_of[i[0]] for i in ids]


def test_each_epoch_serves_exactly_one_member_of_every_cluster(tmp_path):
    fasta, mapping, cluster_of = uniref_data(tmp_path)
    dm = datamodule(tmp_path, fasta, mapping)
    clusters = row_clusters(dm, cluster_of)
    kept = set(clusters)
    picks = []
    for epoch in range(12):
        rows = served_rows(dm, epoch)
        assert sorted(Counter(clusters[r] for r in rows).values()) == [1] * len(kept)  # every cluster once
        picks.append(tuple(sorted(rows)))
    assert len(set(picks)) > 1  # members change from epoch to epoch
    for c in {c for c in kept if clusters.count(c) > 1}:
        chosen = {row for pick in picks for row in pick if clusters[row] == c}
        assert len(chosen) > 1, f"{c} always served the same member"


def test_draws_are_deterministic_per_seed(tmp_path):
    fasta, mapping, _ = uniref_data(tmp_path)
    a, b = datamodule(tmp_path, fasta, mapping, seed=1), datamodule(tmp_path, fasta, mapping, seed=1)
    other = datamodule(tmp_path, fasta, mapping, seed=2)
    assert served_rows(a, 3) == served_rows(b, 3)
    assert np.array_equal(a.clusters.epoch_indices(3), b.clusters.epoch_indices(3))
    assert not np.array_equal(a.clusters.epoch_indices(3), other.clusters.epoch_indices(3))


def test_clusters_and_members_are_drawn_uniformly(tmp_path):
    fasta, mapping, cluster_of = uniref_data(tmp_path)
    dm = datamodule(tmp_path, fasta, mapping, seed=7)
    clusters = row_clusters(dm, cluster_of)
    assert len(set(clusters)) == 20  # no cluster lost to the validation split
    epochs = 1000
    rows = np.concatenate([dm.clusters.epoch_indices(e) for e in range(epochs)])
    # Clusters: each served equally often (the chi-square statistic is 0 by construction; it must stay small).
    per_cluster = np.array(list(Counter(clusters[r] for r in rows).values()))
    chi2_clusters = ((per_cluster - epochs) ** 2 / epochs).sum()
    assert chi2_clusters < CHI2_CRITICAL_0_001[19]
    # Members: uniform within each cluster, pooled over clusters (sum of k - 1 = 40 degrees of freedom).
    per_row = Counter(rows.tolist())
    chi2_members, dof = 0.0, 0
    for c in set(clusters):
        members = [r for r, rc in enumerate(clusters) if rc == c]
        expected = epochs / len(members)
        chi2_members += sum((per_row[r] - expected) ** 2 / expected for r in members)
        dof += len(members) - 1
    assert dof == 40 and chi2_members < CHI2_CRITICAL_0_001[40], chi2_members


def test_a_big_cluster_is_not_oversampled_as_plain_sampling_does(tmp_path):
    sizes = [30] + [1] * 19  # one cluster holds 30 of the 49 sequences
    fasta, mapping, cluster_of = uniref_data(tmp_path, sizes=sizes)
    plain, clustered = datamodule(tmp_path, fasta, None), datamodule(tmp_path, fasta, mapping)
    clusters = row_clusters(plain, cluster_of)

    def big_share(dm):
        rows = [r for e in range(20) for r in served_rows(dm, e)]
        return sum(clusters[r] == "UniRef50_C0" for r in rows) / len(rows)

    assert big_share(plain) == pytest.approx(30 / 49)
    assert big_share(clustered) == pytest.approx(1 / 20)


def test_unmapped_sequences_are_singletons_and_absent_clusters_are_dropped(tmp_path, caplog):
    fasta, mapping, _ = uniref_data(tmp_path, sizes=[3, 2])
    with open(fasta, "a") as f:
        f.write(">UniRef90_extra unmapped\nMKTAYIAKQRQISFVKSHFSRQ\n")
    with open(mapping, "a") as f:
        f.write("UniRef50_gone\tUniRef90_not_in_fasta\n")
    with caplog.at_level(logging.INFO, logger="protein_mlm.data.clusters"):
        dm = datamodule(tmp_path, fasta, mapping)
    assert len(dm.clusters) == 3  # 2 mapped + 1 singleton
    assert "dropped 1 of the 3 clusters" in caplog.text and "1 singletons" in caplog.text


def test_duplicate_sequences_keep_all_their_ids_and_count_once(tmp_path):
    fasta = tmp_path / "dup.fasta"
    fasta.write_text(">UniRef90_A\nMKTAYIAKQR\n>UniRef90_B\nMKTAYIAKQR\n>UniRef90_C\nGGSGGSWWYP\n")
    mapping = tmp_path / "m.tsv"
    mapping.write_text("UniRef50_X\tUniRef90_A\nUniRef50_X\tUniRef90_B\nUniRef50_X\tUniRef90_C\n")
    dm = datamodule(tmp_path, fasta, mapping)
    ids = ids_per_row(dm.train_path, dm.splits["train"])
    assert sorted(map(sorted, ids)) == [["UniRef90_A", "UniRef90_B"], ["UniRef90_C"]]
    assert len(dm.clusters) == 1 and len(dm.clusters.members) == 2  # the duplicate is one member, not two


def test_cluster_arrays_are_cached_beside_the_data_and_memory_mapped(tmp_path, monkeypatch):
    fasta, mapping, _ = uniref_data(tmp_path, sizes=[2, 2])
    first = datamodule(tmp_path, fasta, mapping)
    assert {p.name for p in first.cache_dir.glob("*.clusters/*.npy")} == {"offsets.npy", "members.npy"}
    for name in ("clusters.row_record_ids", "cluster_maps.map_blocks"):
        monkeypatch.setattr(f"protein_mlm.data.{name}", lambda *a, **k: pytest.fail("the cache was not used"))
    again = datamodule(tmp_path, fasta, mapping)
    assert isinstance(again.clusters.members, np.memmap) and isinstance(again.clusters.offsets, np.memmap)
    assert np.array_equal(again.clusters.members, first.clusters.members)
    assert np.array_equal(again.clusters.epoch_indices(3), first.clusters.epoch_indices(3))


def test_validation_holds_out_whole_clusters_and_scores_every_sequence(tmp_path):
    """With a map and no val_path, a cluster is in validation or in training, never in both."""
    fasta, mapping, cluster_of = uniref_data(tmp_path, sizes=[1, 2, 3, 4, 5] * 8)
    settings = dict(train_path=str(fasta), val_fraction=0.3, max_length=64, max_tokens=512, cache_dir=str(tmp_path))
    dm = ProteinDataModule(**settings, cluster_map=str(mapping))
    dm.setup()
    ids = {split: ids_per_row(dm.train_path, dm.splits[split]) for split in dm.splits}
    clusters = {split: {cluster_of[i] for row in rows for i in row} for split, rows in ids.items()}
    assert clusters["val"] and clusters["train"] and not clusters["val"] & clusters["train"]
    rows = [i for batch in dm.val_dataloader().batch_sampler for _, i in batch]
    assert sorted(rows) == list(range(len(dm.splits["val"])))  # validation never samples by cluster
    plain = ProteinDataModule(**settings)
    plain.setup()
    held_out = {cluster_of[i] for row in ids_per_row(plain.train_path, plain.splits["val"]) for i in row}
    assert held_out & clusters["train"]  # per-sequence splitting would leak clusters (the reason for the above)


def idmapping_line(accession: str, uniref90: str, uniref50: str) -> str:
    """One line of UniProt's idmapping_selected.tab: 22 tab-separated columns, UniRef90/50 in columns 9/10."""
    columns = [accession, f"{accession}_HUMAN", "1234", "NP_1.1", "", "", "GO:0005515", f"UniRef100_{accession}"]
    columns += [uniref90, uniref50, "UPI0000001", "", "9606"] + [""] * 9
    assert len(columns) == 22
    return "\t".join(columns) + "\n"


def test_reads_idmapping_selected_tab_gzipped(tmp_path):
    text = (
        idmapping_line("P1", "UniRef90_P1", "UniRef50_P1")
        + idmapping_line("Q2", "UniRef90_P1", "UniRef50_P1")  # another accession of the same UniRef90 cluster
        + idmapping_line("Q3", "UniRef90_Q3", "UniRef50_P1")
        + idmapping_line("R4", "UniRef90_R4", "UniRef50_R4")
        + idmapping_line("S5", "", "")  # an entry without UniRef clusters is skipped
    )
    path = tmp_path / "idmapping_selected.tab.gz"
    path.write_bytes(gzip.compress(text.encode()))
    clusters, in_file = read_cluster_map(path)
    assert clusters == {"UniRef50_P1": ["UniRef90_P1", "UniRef90_Q3"], "UniRef50_R4": ["UniRef90_R4"]}
    assert in_file == 2
    only, _ = read_cluster_map(path, wanted={"UniRef90_Q3"})
    assert only == {"UniRef50_P1": ["UniRef90_Q3"]}


def test_reads_two_column_tsv_with_comments_and_crlf(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_bytes(b"# UniRef50\tUniRef90\r\nC1\tA\r\nC1\tB\r\n\r\nC2\tD\r\n")
    assert read_cluster_map(path) == ({"C1": ["A", "B"], "C2": ["D"]}, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("C1\tA\nC1 B\n", r"m.tsv:2: expected `cluster<TAB>member`"),
        ("C1\tA\nC1\t\n", r"m.tsv:2: expected `cluster<TAB>member`"),
        ("C1\tA\tx\n", r"m.tsv:1: 3 tab-separated columns"),
        ("C1\tA\nC2\tA\n", r"m.tsv:2: member A is in cluster C2 here and in C1 on line 1"),
        ("# only a comment\n", "holds no cluster/member lines"),
    ],
)
def test_malformed_maps_are_one_line_errors_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "m.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_cluster_map(path)
    assert "\n" not in str(info.value)


def test_truncated_idmapping_line_names_its_line(tmp_path):
    path = tmp_path / "idmapping_selected.tab"
    path.write_text(idmapping_line("P1", "UniRef90_P1", "UniRef50_P1") + "P2\tP2_HUMAN\t1\n")
    with pytest.raises(DataError, match=r"idmapping_selected.tab:2: 3 columns"):
        read_cluster_map(path)


def test_missing_map_and_no_overlap_are_one_line_errors(tmp_path):
    fasta, _, _ = uniref_data(tmp_path, sizes=[2])
    with pytest.raises(DataError, match="data.cluster_map=.*nope.tsv does not exist"):
        ProteinDataModule(train_path=str(fasta), cluster_map=str(tmp_path / "nope.tsv"))
    other = tmp_path / "other.tsv"
    other.write_text("UniRef50_Z\tsp|P12345|X_HUMAN\n")
    with pytest.raises(DataError, match="no member id in .*other.tsv is a record id of") as info:
        datamodule(tmp_path, fasta, other)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        cluster_arrays(
            tmp_path / "nope.tsv", [pa.table({"id": ["a"], "row": [0]})], rows=1, source="x", folder=tmp_path
        )


def test_an_epoch_in_the_plan_is_one_member_per_cluster(tmp_path):
    fasta, mapping, _ = uniref_data(tmp_path, sizes=[30] + [1] * 19)
    plain, clustered = datamodule(tmp_path, fasta, None), datamodule(tmp_path, fasta, mapping)
    lengths = clustered.token_lengths("train")
    assert clustered.train_tokens() == lengths[clustered.clusters.epoch_indices(0)].sum() < plain.train_tokens()


def test_training_with_a_cluster_map_runs_end_to_end(tiny_cfg, tmp_path):
    from protein_mlm.train import train

    fasta, mapping, _ = uniref_data(tmp_path, sizes=[1, 2, 3, 4, 5] * 20)
    cfg = tiny_cfg(f"data.train_path={fasta}", f"data.cluster_map={mapping}", "trainer.max_steps=4")
    assert train(cfg)["steps"] == 4


def test_fixed_batch_size_sampler_serves_one_member_per_cluster_too(tmp_path):
    fasta, mapping, cluster_of = uniref_data(tmp_path)
    dm = datamodule(tmp_path, fasta, mapping)
    dm.max_tokens = None  # data.max_tokens=null: EpochSampler with data.batch_size
    clusters = row_clusters(dm, cluster_of)
    batcher = dm.train_dataloader().batcher
    for epoch in (0, 1):
        rows = [int(index) for batch in batcher.rank_batches(epoch) for index in batch]
        assert len(rows) == 20
        assert sorted(rows) == sorted(dm.clusters.epoch_indices(epoch).tolist())
        assert len({clusters[r] for r in rows}) == 20


def test_a_binary_map_is_a_one_line_error(tmp_path):
    path = tmp_path / "map.bin"
    path.write_bytes(b"C1\tA\n\xff\xfe\x00\x01\n")
    with pytest.raises(DataError, match="cannot read .*map.bin as a text cluster map") as info:
        read_cluster_map(path)
    assert "\n" not in str(info.value)


def test_draws_in_chunks_equal_one_draw_over_all_clusters(monkeypatch):
    """The epoch's member draw runs in chunks (bounded memory); the rows equal one vectorised draw of today."""
    sizes = np.random.default_rng(0).integers(1, 9, size=1000)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    members = np.random.default_rng(1).permutation(int(offsets[-1]))
    rng = np.random.default_rng([5, 2, clusters.CLUSTER_STREAM])
    whole = members[offsets[:-1] + rng.integers(np.diff(offsets))]
    monkeypatch.setattr(clusters, "DRAW_CLUSTERS", 7)
    assert np.array_equal(clusters.ClusterSampler(offsets, members, seed=5).epoch_indices(2), whole)
