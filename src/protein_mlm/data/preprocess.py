"""FASTA or Parquet -> deduplicated, content-hash-split, tokenized Arrow datasets, cached on disk and memory-mapped."""

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter

from protein_mlm.alphabet import VOCAB, encode_residues
from protein_mlm.data.clusters import record_clusters
from protein_mlm.data.fasta import sequence_digest
from protein_mlm.data.readers import parse_workers, read_sequences
from protein_mlm.errors import DataError

_LETTERS = np.frombuffer("".join(t if len(t) == 1 else "?" for t in VOCAB).encode(), dtype=np.uint8)

log = logging.getLogger(__name__)
datasets.disable_progress_bars()  # the one-off Arrow conversion is quick; its bars only clutter the log

BUNDLED_FASTA = resources.files("protein_mlm") / "assets" / "swissprot_sample.fasta.gz"
CACHE_FORMAT = 2  # bump when the stored layout or the split rule changes, so old caches are not reused
FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint8"))})  # 1 byte per residue
CHUNK_RECORDS = 10_000  # records per Arrow write: bounds the memory preprocessing needs, whatever the file size


@dataclass
class SplitStats:
    """What preprocessing did, for the start-up log and the run summary."""

    train_sequences: int
    val_sequences: int
    duplicates_removed: int
    empty_removed: int
    val_overlap_removed: int
    val_capped: int = 0  # held-out sequences trained on because validation had reached data.val_max_sequences


def is_val_sequence(residues: bytes, val_fraction: float) -> bool:
    """Deterministic split by content hash: file order does not matter and duplicates cannot straddle it."""
    digest = hashlib.blake2b(residues, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def holds_out(record_id: str, residues: bytes, val_fraction: float, cluster_of: dict[str, str] | None) -> bool:
    """Whether a record goes to validation: by its cluster's name when it has one (whole clusters are held out,
    so no close homolog of a validation sequence is trained on), else by its content."""
    cluster = cluster_of.get(record_id) if cluster_of else None
    if cluster is None:
        return is_val_sequence(residues, val_fraction)
    return is_val_sequence(b"cluster:" + cluster.encode(), val_fraction)


class DigestSet:
    """A set of 16-byte digests held as a few sorted numpy runs: 16 bytes per entry (a Python set needs ~150).

    Each `add` appends a sorted run; equal-sized neighbours are merged (as an LSM tree), so there are O(log n)
    runs to search and the merges cost O(n log n) in all.
    """

    def __init__(self):
        self.runs: list[np.ndarray] = []  # dtype S16, each sorted

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            found |= run[at] == digests
        return found

    def add(self, digests: np.ndarray) -> np.ndarray:
        """Add `digests`; True at the first occurrence of each one that was not in the set yet."""
        _, first = np.unique(digests, return_index=True)
        first = first[~self.contains(digests[first])]
        new = np.zeros(len(digests), dtype=bool)
        new[first] = True
        if len(first):
            self.runs.append(np.sort(digests[first]))
            while len(self.runs) > 1 and len(self.runs[-2]) <= len(self.runs[-1]):
                self.runs[-2:] = [np.sort(np.concatenate(self.runs[-2:]), kind="stable")]  # timsort: linear here
        return new


def _unique_sequences(
    path: Path, seen: DigestSet, counts: dict[str, int], exclude: DigestSet | None = None
) -> Iterator[tuple[str, bytes]]:
    """(record id, residues) of a FASTA in file order, exact duplicates, empty records and those in `exclude`
    dropped.

    Duplicates are found by 16-byte blake2b digest, a chunk of records at a time, not by keeping the sequences.
    `counts` gains the records read, the empty ones, the duplicates and the excluded ones.
    """
    chunk: list[tuple[str, bytes]] = []
    for record_id, residues in read_sequences(path, workers=parse_workers()):
        counts["records"] += 1
        if not residues:
            counts["empty"] += 1
            continue
        chunk.append((record_id, residues))
        if len(chunk) >= CHUNK_RECORDS:
            yield from _first_seen(chunk, seen, counts, exclude)
            chunk = []
    yield from _first_seen(chunk, seen, counts, exclude)


def _first_seen(chunk: list[tuple[str, bytes]], seen: DigestSet, counts: dict[str, int], exclude: DigestSet | None):
    if not chunk:
        return
    digests = np.array([sequence_digest(r) for _, r in chunk], dtype="S16")
    keep = seen.add(digests)
    counts["duplicates"] += len(chunk) - int(keep.sum())
    if exclude is not None:
        excluded = keep & exclude.contains(digests)
        counts["excluded"] = counts.get("excluded", 0) + int(excluded.sum())
        keep &= ~excluded
    yield from (record for record, k in zip(chunk, keep) if k)


class _ArrowSplitWriter:
    """Appends residue strings to an Arrow file in chunks: one vectorised lookup per chunk, uint8 ids on disk."""

    def __init__(self, path: Path):
        self.path, self.chunk_records = path, CHUNK_RECORDS
        self.writer = ArrowWriter(features=FEATURES, path=str(path))
        self.pending: list[bytes] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count + len(self.pending)

    def add(self, residues: bytes) -> None:
        self.pending.append(residues)
        if len(self.pending) >= self.chunk_records:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        offsets = np.zeros(len(self.pending) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self.pending], out=offsets[1:])
        ids = pa.LargeListArray.from_arrays(offsets, encode_residues(b"".join(self.pending)))
        self.writer.write_table(pa.table({"input_ids": ids.cast(FEATURES.arrow_schema.field("input_ids").type)}))
        self.count += len(self.pending)
        self.pending = []

    def close(self) -> datasets.Dataset:
        self._flush()
        self.writer.finalize()
        self.writer.close()
        return datasets.Dataset.from_file(str(self.path))  # memory-mapped


def cache_key(*paths: Path | None, **settings) -> str:
    """Identify a preprocessing result by the input files' identity (path, size, mtime) and the settings."""
    parts = [str(CACHE_FORMAT), json.dumps(settings, sort_keys=True)]
    for p in paths:
        if p is not None:
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_splits(
    train_path: Path,
    val_path: Path | None,
    val_fraction: float,
    out_dir: Path | None = None,
    cluster_of: dict[str, str] | None = None,
    val_max_sequences: int | None = None,
) -> tuple[dict, SplitStats]:
    """Read, deduplicate and split; with a separate val file, drop its sequences from train (no leakage).
    `cluster_of` (record id -> cluster) holds out whole clusters instead of single sequences; `val_max_sequences`
    caps the held-out split (see `ValidationCap`).

    One streaming pass per file writes `train.arrow` / `val.arrow` into `out_dir` (a new temporary dir by
    default) in file order; memory grows only by the 16-byte digest of each unique sequence.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="protein_mlm-splits-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {name: _ArrowSplitWriter(out_dir / f"{name}.arrow") for name in ("train", "val")}
    counts = {"records": 0, "empty": 0, "duplicates": 0, "excluded": 0}
    if val_path is None:
        cap = ValidationCap(val_max_sequences, cluster_of)
        for record_id, residues in _unique_sequences(train_path, DigestSet(), counts):
            held_out = holds_out(record_id, residues, val_fraction, cluster_of)
            writers["val" if held_out and cap.admits(record_id, len(writers["val"])) else "train"].add(residues)
        counts["capped"] = cap.capped
    else:
        val_digests = DigestSet()
        for _, residues in _unique_sequences(val_path, val_digests, {"records": 0, "empty": 0, "duplicates": 0}):
            writers["val"].add(residues)
        for _, residues in _unique_sequences(train_path, DigestSet(), counts, exclude=val_digests):
            writers["train"].add(residues)
    splits = {name: writer.close() for name, writer in writers.items()}
    if counts["records"] == counts["empty"]:
        raise DataError(f"{train_path} holds no sequence (only headers?); pass a FASTA with sequences")
    if val_path is not None and not len(splits["val"]):
        raise DataError(f"{val_path} holds no sequence (only headers?); pass a validation FASTA with sequences")
    if not len(splits["train"]) or not len(splits["val"]):
        which = "training" if not len(splits["train"]) else "validation"
        fix = "pass a training FASTA that differs from data.val_path" if val_path else "change data.val_fraction"
        raise DataError(f"the {which} split of {train_path} is empty; give more sequences or {fix}")
    stats = SplitStats(
        len(splits["train"]),
        len(splits["val"]),
        counts["duplicates"],
        counts["empty"],
        counts["excluded"],
        counts.get("capped", 0),
    )
    return splits, stats


class ValidationCap:
    """data.val_max_sequences: the held-out split keeps its first `limit` sequences in file order; a held-out
    sequence past it trains instead, unless its cluster already has a member in validation (whole clusters stay
    on one side, so nothing leaks). Without a cluster map each sequence is its own cluster."""

    def __init__(self, limit: int | None, cluster_of: dict[str, str] | None):
        self.limit, self.cluster_of = limit, cluster_of
        self.val_clusters: set[str] = set()  # at most `limit` entries
        self.capped = 0

    def admits(self, record_id: str, held: int) -> bool:
        """Whether a held-out record goes to validation, given the `held` sequences already there."""
        cluster = self.cluster_of.get(record_id) if self.cluster_of else None
        if self.limit is None or held < self.limit or (cluster is not None and cluster in self.val_clusters):
            if cluster is not None and self.limit is not None:
                self.val_clusters.add(cluster)
            return True
        self.capped += 1
        return False


def remove_abandoned_builds(cache_dir: Path, key: str) -> None:
    """Delete half-built caches of `key` whose process is gone (killed during preprocessing)."""
    for folder in cache_dir.glob(f".{key}-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def load_splits(
    train_path: Path,
    val_path: Path | None,
    val_fraction: float,
    cache_dir: Path,
    cluster_map: Path | None = None,
    val_max_sequences: int | None = None,
) -> tuple[dict[str, datasets.Dataset], SplitStats]:
    """Memory-mapped Arrow splits, built once per input (`prepare_splits`) and reused from `cache_dir` afterwards."""
    target = prepare_splits(train_path, val_path, val_fraction, cache_dir, cluster_map, val_max_sequences)
    stats = SplitStats(**json.loads((target / "stats.json").read_text()))
    splits = {name: datasets.Dataset.from_file(str(target / f"{name}.arrow")) for name in ("train", "val")}
    return splits, stats


def splits_dir(
    train_path: Path,
    val_path: Path | None,
    val_fraction: float,
    cache_dir: Path,
    cluster_map: Path | None = None,
    val_max_sequences: int | None = None,
) -> Path:
    """Where the splits of these inputs and settings are cached (built when it holds stats.json)."""
    cluster_map = cluster_map if val_path is None else None
    settings = {"val_fraction": None if val_path else val_fraction}
    if val_max_sequences is not None and val_path is None:  # absent when unset: older caches stay valid
        settings["val_max_sequences"] = val_max_sequences
    return cache_dir / cache_key(train_path, val_path, cluster_map, **settings)


def prepare_splits(
    train_path: Path,
    val_path: Path | None,
    val_fraction: float,
    cache_dir: Path,
    cluster_map: Path | None = None,
    val_max_sequences: int | None = None,
) -> Path:
    """Build the splits' cache unless it exists; returns its folder. With a `cluster_map` and no `val_path`,
    validation holds out whole clusters."""
    target = splits_dir(train_path, val_path, val_fraction, cache_dir, cluster_map, val_max_sequences)
    cluster_map = cluster_map if val_path is None else None
    key = target.name
    if not (target / "stats.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_builds(cache_dir, key)
        # Build beside the target and rename, so concurrent runs never read a half-written cache.
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-{os.getpid()}-"))
        try:
            cluster_of = record_clusters(train_path, cluster_map) if cluster_map else None
            _, stats = build_splits(
                train_path, val_path, val_fraction, tmp, cluster_of=cluster_of, val_max_sequences=val_max_sequences
            )
            (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("Tokenized %s into %s", train_path, target)
    return target


def sequences_file(path: Path, cache_dir: Path) -> Path:
    """Where load_sequences caches the unique sequences of `path`."""
    return cache_dir / f"{cache_key(path, unique_sequences=True)}.arrow"


def load_sequences(path: Path, cache_dir: Path) -> datasets.Dataset:
    """One FASTA's unique sequences in file order (e.g. the validation file of a streaming run), cached."""
    target = sequences_file(path, cache_dir)
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}-")
        os.close(fd)
        writer = _ArrowSplitWriter(Path(tmp))
        for _, residues in _unique_sequences(path, DigestSet(), {"records": 0, "empty": 0, "duplicates": 0}):
            writer.add(residues)
        if not len(writer.close()):
            os.unlink(tmp)
            raise DataError(f"{path} holds no non-empty sequence; pass a FASTA file with sequences")
        os.replace(tmp, target)  # atomic: a concurrent run reads no half-written file
    return datasets.Dataset.from_file(str(target))


def decode_ids(ids: np.ndarray) -> bytes:
    """The residue letters of token ids (the inverse of encode_residues), e.g. to hash a stored sequence."""
    return _LETTERS[ids].tobytes()


def residue_lengths(sequences: datasets.Dataset) -> np.ndarray:
    """Length of every sequence, read from the Arrow offsets without materialising the rows."""
    return pc.list_value_length(sequences.data.column("input_ids")).to_numpy()


def unigram_perplexity(sequences: datasets.Dataset) -> float:
    """Perplexity of the split's own amino-acid frequencies: what a context-free predictor can reach."""
    ids = pc.list_flatten(sequences.data.column("input_ids")).to_numpy()
    probs = np.bincount(ids, minlength=len(VOCAB)) / len(ids)
    probs = probs[probs > 0]
    return math.exp(-(probs * np.log(probs)).sum())
