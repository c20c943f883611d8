"""UniRef cluster sampling as ESM-2: each epoch draws every UniRef50 cluster once, with one random member.

ESM-2 (Lin et al. 2023) trains on UniRef90 sequences sampled by UniRef50 cluster: a cluster is drawn first,
then one of its members. We read that as: every epoch visits every cluster exactly once, in random order, with a
member drawn uniformly from the cluster, so each cluster is seen equally often however many members it has.
FASTA headers do not carry the UniRef50 cluster, hence a separate mapping file (formats: cluster_maps.py).

Members are matched to the training rows by record id (a FASTA header's first word, a Parquet `id`). Exact
duplicates share one row, so a row stands for every record id it holds. The map is read once, streamed, and joined
to the rows out of core (cluster_join.py: memory flat with the map's size); the result is kept beside the Arrow data
as two integer arrays in CSR form (cluster c owns members[offsets[c]:offsets[c+1]], rows of the training split),
memory-mapped by every later run and rank.
"""

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protein_mlm.alphabet import encode_residues
from protein_mlm.data import cluster_join
from protein_mlm.data.cluster_join import BUCKET_LINES, MAX_BUCKETS, cluster_arrays, hash_bucket, read_bucket
from protein_mlm.data.cluster_maps import match_records, read_cluster_table, record_clusters
from protein_mlm.data.fasta import sequence_digest
from protein_mlm.data.readers import parse_workers, read_sequences

__all__ = ["ClusterSampler", "cluster_arrays", "load_cluster_sampler", "match_records", "read_cluster_table"]
__all__ += ["record_clusters", "row_record_ids", "build_cluster_cache", "open_cluster_cache", "write_cluster_cache"]

log = logging.getLogger(__name__)

MATCH_RECORDS = 1_000_000  # records hashed and matched to rows at a time (bounded memory on a first read)
DRAW_CLUSTERS = 1 << 22  # clusters drawn at a time: an epoch's temporaries stay small at 65M clusters
CLUSTER_STREAM = 0xC1057E5  # keeps the member draws independent of the batch sampler's (seed, epoch) stream


def _row_digests(sequences: datasets.Dataset) -> Iterator[pa.Table]:
    """(digest, row) for every row of `sequences`, a chunk of rows at a time."""
    row = 0
    for chunk in sequences.data.column("input_ids").chunks:
        values = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
        ends = np.cumsum(pc.list_value_length(chunk).to_numpy(zero_copy_only=False))
        starts = np.concatenate([[0], ends[:-1]])
        digests = [sequence_digest(values[start:end].tobytes()) for start, end in zip(starts, ends)]
        yield pa.table({"digest": pa.array(digests, pa.binary()), "row": np.arange(row, row + len(digests))})
        row += len(digests)


def _record_digests(path: Path) -> Iterator[pa.Table]:
    """(id, digest) for every record of `path` with residues, MATCH_RECORDS at a time."""
    ids, keys = [], []
    for record_id, residues in read_sequences(path, workers=parse_workers()):
        if residues:  # empty records have no row
            ids.append(record_id)
            keys.append(sequence_digest(encode_residues(residues).tobytes()))
        if len(ids) >= MATCH_RECORDS:
            yield pa.table({"id": pa.array(ids, pa.string()), "digest": pa.array(keys, pa.binary())})
            ids, keys = [], []
    if ids:
        yield pa.table({"id": pa.array(ids, pa.string()), "digest": pa.array(keys, pa.binary())})


def row_record_ids(path: Path, sequences: datasets.Dataset, spill_dir: Path | None = None) -> Iterator[pa.Table]:
    """(id, row) tables: the record ids of `path` each row of `sequences` stands for, matched by content digest out
    of core (rows and records spilled under `spill_dir` in buckets by digest, joined a bucket at a time); records of
    the other split match no row."""
    buckets = max(1, min(MAX_BUCKETS, math.ceil(len(sequences) / BUCKET_LINES)))
    with tempfile.TemporaryDirectory(dir=spill_dir, prefix="row-ids-") as work:
        work = Path(work)

        def by_digest(table: pa.Table) -> np.ndarray:
            return hash_bucket(table["digest"], buckets)

        cluster_join.spill(_row_digests(sequences), by_digest, work / "rows")
        cluster_join.spill(_record_digests(path), by_digest, work / "records")
        for bucket in range(buckets):
            rows, records = read_bucket(work / "rows", bucket), read_bucket(work / "records", bucket)
            if rows is not None and records is not None:
                yield records.join(rows, keys="digest", join_type="inner").select(["id", "row"])


@dataclass
class ClusterSampler:
    """Clusters as index ranges over `members` (dataset rows); `epoch_indices(epoch)` draws one row per cluster."""

    offsets: np.ndarray  # (clusters + 1,): cluster c owns members[offsets[c]:offsets[c + 1]]
    members: np.ndarray  # dataset rows, grouped by cluster
    seed: int
    _last: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """One uniformly drawn member row per cluster, every cluster once, deterministic from (seed, epoch)."""
        last = self._last  # read once: the next epoch may be planned in a background thread meanwhile
        if last is not None and last[0] == epoch:
            return last[1]
        rng = np.random.default_rng([self.seed, epoch, CLUSTER_STREAM])
        rows = np.empty(len(self), dtype=np.int64)
        for start in range(0, len(self), DRAW_CLUSTERS):  # int64 bounds: chunked draws are the one-call stream
            bounds = np.asarray(self.offsets[start : start + DRAW_CLUSTERS + 1])
            rows[start : start + len(bounds) - 1] = self.members[bounds[:-1] + rng.integers(np.diff(bounds))]
        self._last = (epoch, rows)
        return rows


def build_cluster_cache(cluster_map: Path, records: Iterable[pa.Table], rows: int, source: str, cache: Path) -> None:
    """Build the CSR arrays of `records` ((id, row) tables) into a new folder beside `cache`, then rename it."""
    tmp = _new_folder(cache)
    try:
        clusters = cluster_arrays(cluster_map, records, rows, source, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, cache, rows, clusters)


def load_cluster_sampler(
    cluster_map: Path, path: Path, sequences: datasets.Dataset, cache: Path, seed: int
) -> ClusterSampler:
    """The cluster sampler of `sequences` (read from `path`), its arrays built once into `cache` and memory-mapped."""
    arrays = open_cluster_cache(cache, len(sequences))
    if arrays is None:
        records = row_record_ids(path, sequences, spill_dir=cache.parent)
        build_cluster_cache(cluster_map, records, len(sequences), str(path), cache)
        arrays = open_cluster_cache(cache, len(sequences))
    return ClusterSampler(offsets=arrays[0], members=arrays[1], seed=seed)


def open_cluster_cache(cache: Path, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, members) memory-mapped from `cache`; None when it is absent or was built for another row count."""
    meta = cache / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("rows") != rows:
        return None
    return np.load(cache / "offsets.npy", mmap_mode="r"), np.load(cache / "members.npy", mmap_mode="r")


def write_cluster_cache(cache: Path, offsets: np.ndarray, members: np.ndarray, rows: int) -> None:
    """Write in-memory arrays as the cache of `rows` rows (beside the target, then renamed)."""
    tmp = _new_folder(cache)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "members.npy", members)
    _publish(tmp, cache, rows, len(offsets) - 1)


def _new_folder(cache: Path) -> Path:
    """A new private folder beside `cache` (same file system: the rename is atomic)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-{os.getpid()}-"))


def _publish(tmp: Path, cache: Path, rows: int, clusters: int) -> None:
    """Rename the finished `tmp` to `cache`: a concurrent run reads the old cache or the whole new one."""
    (tmp / "meta.json").write_text(json.dumps({"rows": rows, "clusters": clusters}))
    shutil.rmtree(cache, ignore_errors=True)  # a stale cache (another row count) of the same key
    try:
        os.rename(tmp, cache)
    except OSError:  # another process won the race; its copy is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
