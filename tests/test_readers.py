"""The reader seam: Parquet inputs read as their FASTA twins, train the same batches, and fail in one line."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protein_mlm.data import fasta as fasta_module
from protein_mlm.data.datamodule import ProteinDataModule
from protein_mlm.data.fasta import read_fasta_records
from protein_mlm.data.preprocess import BUNDLED_FASTA, build_splits
from protein_mlm.data.readers import read_records, read_sequences
from protein_mlm.data.streaming import fasta_files
from protein_mlm.errors import ConfigError, DataError
from protein_mlm.inference.evaluate import fasta_dataset
from tests.test_epochs import served, train_small


def to_parquet(fasta: Path, path: Path, ids: bool = True, row_group_size: int = 7) -> Path:
    """The FASTA's records as a Parquet table (small row groups, so batched reading is exercised)."""
    records = list(read_fasta_records(fasta))
    columns = {"sequence": [residues.decode() for _, _, residues in records]}
    if ids:
        columns = {"id": [record_id for record_id, _, _ in records], **columns}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def small_parquet(small_fasta: list[str], folder: Path, ids: bool = True) -> list[str]:
    """small_fasta's overrides with its two FASTA files swapped for Parquet twins."""
    overrides = []
    for item in small_fasta:
        key, value = item.split("=", 1)
        if key in ("data.train_path", "data.val_path"):
            value = str(to_parquet(Path(value), folder / (Path(value).stem + ".parquet"), ids=ids))
        overrides.append(f"{key}={value}")
    return overrides


def test_training_from_parquet_serves_the_same_batches_as_from_fasta(tmp_path, small_fasta):
    steps = ["trainer.max_steps=10"]
    from_fasta = train_small(tmp_path / "fasta", small_fasta, *steps)
    from_parquet = train_small(tmp_path / "parquet", small_parquet(small_fasta, tmp_path), *steps)
    batches = served(Path(from_fasta.paths.output_dir))
    assert sum(len(b) for b in batches.values()) == 10 and len(batches) >= 2  # an epoch boundary is crossed
    assert served(Path(from_parquet.paths.output_dir)) == batches


def test_parquet_records_match_the_fasta_and_unnamed_rows_are_numbered(tmp_path, small_fasta):
    fasta = Path(small_fasta[0].split("=", 1)[1])
    named, unnamed = to_parquet(fasta, tmp_path / "a.parquet"), to_parquet(fasta, tmp_path / "b.pq", ids=False)
    assert list(read_sequences(named)) == list(read_sequences(fasta))
    rows = list(read_records(unnamed))
    assert [r[0] for r in rows[:2]] == ["row0", "row1"] and [r[2] for r in rows] == [r[2] for r in read_records(fasta)]
    assert fasta_dataset(named)["input_ids"] == fasta_dataset(fasta)["input_ids"]  # eval reads it too
    folder = tmp_path / "shards"
    folder.mkdir()
    to_parquet(fasta, folder / "part-0.parquet")
    assert fasta_files(folder) == [folder / "part-0.parquet"]  # streaming shards may be Parquet


def test_parquet_without_ids_refuses_a_cluster_map(tmp_path, small_fasta):
    fasta = Path(small_fasta[0].split("=", 1)[1])
    unnamed = to_parquet(fasta, tmp_path / "train.parquet", ids=False)
    mapping = tmp_path / "map.tsv"
    mapping.write_text("C1\tsome_id\n")
    with pytest.raises(ConfigError, match="has no `id` column") as info:
        ProteinDataModule(train_path=str(unnamed), cluster_map=str(mapping), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"id": ["a"], "seq": ["MKV"]}, r"has no `sequence` column \(columns: id, seq\)"),
        ({"id": ["a", "b"], "sequence": ["MKV", None]}, r": row 1 has a null `sequence`"),
        ({"sequence": ["MKV", "MK1V"]}, r": row 1:3: invalid residue character '1'"),
        ({"sequence": ["MK-V"]}, r": row 0: alignment gap characters"),
        ({"sequence": [1, 2]}, r"column `sequence` holds int64, not text"),
        ({"sequence": pa.array([], pa.string())}, r"holds no rows"),
    ],
)
def test_bad_parquet_inputs_are_one_line_errors(tmp_path, table, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(DataError, match=message) as info:
        list(read_records(path))
    assert "\n" not in str(info.value)


def test_a_file_that_is_not_parquet_is_a_one_line_error(tmp_path):
    path = tmp_path / "text.parquet"
    path.write_text(">a\nMKV\n")
    with pytest.raises(DataError, match="cannot read .*text.parquet as Parquet") as info:
        list(read_records(path))
    assert "\n" not in str(info.value)


def test_a_fasta_parsed_in_processes_gives_the_same_records_splits_and_errors(tmp_path, monkeypatch):
    """Blocks of whole records parsed by 2 processes: the records, the split files and error lines are unchanged."""
    bundled = Path(str(BUNDLED_FASTA))  # gzipped: the parent decompresses, the workers parse
    one = list(read_fasta_records(bundled))
    monkeypatch.setattr(fasta_module, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(fasta_module, "BLOCK_BYTES", 50_000)  # ~90 blocks
    assert list(read_fasta_records(bundled, workers=2)) == one
    monkeypatch.setattr("protein_mlm.data.preprocess.parse_workers", lambda: 2)
    parallel, _ = build_splits(bundled, None, 0.03, tmp_path / "parallel")
    monkeypatch.setattr("protein_mlm.data.preprocess.parse_workers", lambda: 1)
    single, _ = build_splits(bundled, None, 0.03, tmp_path / "single")
    for name in ("train.arrow", "val.arrow"):
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    bad = tmp_path / "bad.fasta"
    bad.write_bytes(b"".join(b">r%d\nMKV\nAC\n" % i for i in range(20_000)) + b">last\nMK1V\n")
    messages = []
    for workers in (1, 2):
        with pytest.raises(DataError) as info:
            list(read_fasta_records(bad, workers=workers))
        messages.append(str(info.value))
    assert messages[0] == messages[1] and ":60002:3: invalid residue character '1'" in messages[0]
