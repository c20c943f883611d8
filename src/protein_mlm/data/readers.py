"""The reader seam: a sequence file -> (record id, header, residues), the format chosen by the file's suffix.

FASTA (plain or gzipped) goes through the strict reader in fasta.py; Parquet (UniRef/BioNeMo-style dumps) needs a
`sequence` column and may have an `id` column, and is read in record batches through pyarrow (bounded memory).
Both apply the same residue rules (`fasta.check_residues`); empty sequences are yielded for the caller to count.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from protein_mlm.data.fasta import check_residues, read_fasta_records
from protein_mlm.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
SEQUENCE_COLUMN, ID_COLUMN = "sequence", "id"
BATCH_ROWS = 10_000  # Parquet rows decoded at a time: memory stays bounded whatever the file size


def is_parquet(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(PARQUET_SUFFIXES)


def parse_workers() -> int:
    """Processes that parse a large FASTA for preprocessing: the cores this process may use, up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def read_records(path: str | Path, workers: int = 1) -> Iterator[tuple[str, str, bytes]]:
    """(record id, header, upper-case residues) for every record of a FASTA or Parquet file, in file order; a large
    FASTA is parsed in `workers` processes (same records, same order)."""
    return _parquet_records(Path(path)) if is_parquet(path) else read_fasta_records(path, workers)


def read_sequences(path: str | Path, workers: int = 1) -> Iterator[tuple[str, bytes]]:
    """(record id, upper-case residues) for every record, as read_records."""
    for record_id, _, residues in read_records(path, workers):
        yield record_id, residues


def has_record_ids(path: str | Path) -> bool:
    """Whether records carry ids a cluster map can name: FASTA always, Parquet only with an `id` column."""
    return not is_parquet(path) or ID_COLUMN in _parquet_file(Path(path)).schema_arrow.names


def _parquet_file(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path (data.train_path / data.val_path)")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0]
        raise DataError(f"cannot read {path} as Parquet ({reason}); pass an intact Parquet file") from None
    if SEQUENCE_COLUMN not in parquet.schema_arrow.names:
        raise DataError(
            f"{path} has no `{SEQUENCE_COLUMN}` column (columns: {', '.join(parquet.schema_arrow.names)}); "
            f"a Parquet input needs the residues in `{SEQUENCE_COLUMN}` (ids optional, in `{ID_COLUMN}`)"
        )
    kind = parquet.schema_arrow.field(SEQUENCE_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        raise DataError(f"{path}: column `{SEQUENCE_COLUMN}` holds {kind}, not text; store the residues as strings")
    return parquet


def _parquet_records(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Parquet rows as records; rows without an id column are named `row<N>` (0-based)."""
    parquet = _parquet_file(path)
    columns = [c for c in (ID_COLUMN, SEQUENCE_COLUMN) if c in parquet.schema_arrow.names]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            sequences = batch.column(SEQUENCE_COLUMN).to_pylist()
            ids = batch.column(ID_COLUMN).to_pylist() if ID_COLUMN in columns else [None] * len(sequences)
            for record_id, sequence in zip(ids, sequences):
                yield _parquet_record(path, row, record_id, sequence)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} ({str(e).splitlines()[0]}); pass an intact Parquet file") from None
    if row == 0:
        raise DataError(f"{path} holds no rows; pass a Parquet file with a `{SEQUENCE_COLUMN}` column of sequences")


def _parquet_record(path: Path, row: int, record_id, sequence) -> tuple[str, str, bytes]:
    if sequence is None:
        raise DataError(f"{path}: row {row} has a null `{SEQUENCE_COLUMN}`; drop the row or fill in its residues")
    residues = (sequence.encode() if isinstance(sequence, str) else bytes(sequence)).strip()
    check_residues(residues, f"{path}: row {row}")
    name = f"row{row}" if record_id is None else str(record_id)
    return name, name, residues.upper()
