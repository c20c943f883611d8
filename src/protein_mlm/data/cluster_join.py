"""The first read of a cluster map, out of core: the training rows of every cluster as CSR arrays on disk.

Map lines and record ids are spilled to disk in buckets by a hash of the member id (an Arrow stream file each) and
joined one bucket at a time; the matched (cluster, row) pairs are spilled again in ranges of cluster names (range
boundaries from a sample of the names) and sorted one range at a time, appending to the arrays. Memory holds about
one bucket and a flag per row, flat with the map's size; the result equals an in-memory join and sort, byte for byte.
"""

import logging
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protein_mlm.data import cluster_maps
from protein_mlm.errors import DataError

log = logging.getLogger("protein_mlm.data.clusters")  # one logger for cluster sampling, whichever module logs

BUCKET_LINES = 1_000_000  # map lines (or records) per spilled bucket: each join and sort holds about this many
SAMPLE_EVERY = 64  # one map line in this many gives a cluster name to place the range buckets' boundaries
ROW_CHUNK = 1 << 22  # rows scanned at a time for the singletons
MAX_BUCKETS = 256  # spill files open at once (a common open-file limit is 1024)


def cluster_arrays(cluster_map: Path, records: Iterable[pa.Table], rows: int, source: str, folder: Path) -> int:
    """Write offsets.npy and members.npy into `folder`: the rows of each mapped cluster (clusters in name order, rows
    ascending, each once), then every row in no cluster as a singleton; returns the cluster count. Out of core:
    memory holds about one bucket (BUCKET_LINES lines) and a flag per row, whatever the map's size."""
    cluster_map = Path(cluster_map)
    cluster_maps.check_exists(cluster_map)
    blocks = cluster_maps.map_blocks(cluster_map)
    with tempfile.TemporaryDirectory(dir=folder, prefix="spill-") as work:
        work = Path(work)
        buckets = _member_buckets(cluster_map, rows)
        lines, sample = _spill_map(blocks, buckets, work / "map")
        if not lines:
            raise cluster_maps.no_lines(cluster_map)
        example = spill(records, lambda table: hash_bucket(table["id"], buckets), work / "records")
        splitters = _splitters(sample, min(MAX_BUCKETS, math.ceil(lines / BUCKET_LINES)))
        matched, two_clusters = _join_buckets(work, buckets, splitters)
        if two_clusters:
            cluster_maps.check_lines(cluster_map, two_clusters)  # names the line (a member in two clusters)
        if not matched:
            raise DataError(
                f"no member id in {cluster_map} is a record id of {source} (e.g. {example or '?'!r}); the members "
                "must be the record ids (the first word of each FASTA header, e.g. UniRef90_P12345, or a Parquet `id`)"
            )
        return _write_csr(work / "clusters", len(splitters) + 1, rows, folder, cluster_map, source)


def _member_buckets(cluster_map: Path, rows: int) -> int:
    """Buckets of the member join: about BUCKET_LINES map lines (guessed from the file's size) or rows in each."""
    size = cluster_map.stat().st_size * (4 if cluster_map.suffix == ".gz" else 1)  # gzip shrinks text ~4x
    return max(1, min(MAX_BUCKETS, math.ceil(max(size / (40 * BUCKET_LINES), rows / BUCKET_LINES))))  # ~40 B/line


def hash_bucket(strings: pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A bucket in [0, buckets) for every string, from its length and its first, middle and last 8 bytes
    (vectorised; a string lands in the same bucket whichever table it comes from)."""
    array = strings.combine_chunks().cast(pa.large_binary())
    bounds = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8)[bounds[0] : bounds[-1]] if len(array) else b""
    padded = np.concatenate([np.frombuffer(data, np.uint8), np.zeros(8, np.uint8)])
    words = np.ndarray(shape=(len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))  # 8 bytes at any offset
    bounds = bounds - bounds[0]
    start, length = bounds[:-1], np.diff(bounds)
    width = np.minimum(length, 8)
    masks = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)  # keep `width` bytes
    digest = length.astype(np.uint64)
    for begin in (start, bounds[1:] - width, start + (length - width) // 2):
        digest = (digest ^ (words[begin] & masks[width])) * np.uint64(0x9E3779B97F4A7C15)
        digest ^= digest >> np.uint64(29)
    return (digest % np.uint64(buckets)).astype(np.int32)


def spill(tables: Iterable[pa.Table], bucket_of, folder: Path) -> str | None:
    """Append `tables` to one Arrow stream file per bucket (folder/<bucket>.arrow), split by `bucket_of(table)`;
    written as they come (no queue: memory holds one table). Returns the first value of the first column (for error
    messages), None when there is none."""
    folder.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    first = None
    try:
        for table in tables:
            if not table.num_rows:
                continue
            first = table.column(0)[0].as_py() if first is None else first
            buckets = bucket_of(table)
            order = np.argsort(buckets, kind="stable")
            table, buckets = table.take(order), buckets[order]
            starts = np.flatnonzero(np.diff(buckets, prepend=-1))
            for start, end in zip(starts, [*starts[1:], len(buckets)]):
                bucket = int(buckets[start])
                if bucket not in writers:
                    writers[bucket] = pa.ipc.new_stream(folder / f"{bucket}.arrow", table.schema)
                writers[bucket].write_table(table.slice(start, end - start))
    finally:
        for writer in writers.values():
            writer.close()
    return first


def read_bucket(folder: Path, bucket: int) -> pa.Table | None:
    """One spilled bucket; None when nothing landed in it."""
    part = folder / f"{bucket}.arrow"
    return pa.ipc.open_stream(pa.memory_map(str(part))).read_all() if part.is_file() else None


def _spill_map(blocks: Iterable[pa.Table], buckets: int, folder: Path) -> tuple[int, pa.ChunkedArray]:
    """Spill the map's (cluster, member) lines by member bucket: (lines, a sample of their cluster names)."""
    lines, sample, rng = 0, [], np.random.default_rng(0)  # the sample only balances the ranges: any one is exact

    def counted() -> Iterator[pa.Table]:
        nonlocal lines
        for block in blocks:
            lines += block.num_rows
            if block.num_rows:
                sample.append(
                    block["cluster"].take(rng.integers(0, block.num_rows, block.num_rows // SAMPLE_EVERY + 1))
                )
            yield block

    spill(counted(), lambda table: hash_bucket(table["member"], buckets), folder)
    return lines, pa.chunked_array(sample, pa.string())


def _as_bytes(names: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Strings as a numpy bytes array: numpy orders it as Arrow sorts the strings (bytewise)."""
    return np.asarray(names.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype="S")


def _splitters(sample: pa.ChunkedArray, ranges: int) -> np.ndarray:
    """Up to `ranges` - 1 sorted cluster names that cut the sampled names into ranges of about equal counts."""
    if ranges <= 1 or not len(sample):
        return np.array([], dtype="S1")
    names = np.sort(_as_bytes(sample))
    return np.unique(names[np.arange(1, ranges) * len(names) // ranges])


def _range_bucket(names: pa.ChunkedArray, splitters: np.ndarray) -> np.ndarray:
    """The range of every cluster name: bucket r holds the names from splitters[r - 1] up to splitters[r]."""
    if not len(splitters):
        return np.zeros(len(names), np.int32)
    codes = pc.dictionary_encode(names.combine_chunks())
    ranges = np.searchsorted(splitters, _as_bytes(codes.dictionary), side="right").astype(np.int32)
    return ranges[codes.indices.to_numpy()]


def _join_buckets(work: Path, buckets: int, splitters: np.ndarray) -> tuple[int, set[str]]:
    """Join each member bucket's map lines to its records; spill the matched (cluster, row) pairs, and (cluster, -1)
    for each cluster with a line that matched no record, by cluster range. Returns (matched lines, ids found in two
    clusters)."""
    matched, two_clusters = 0, set()
    no_records = pa.table({"id": pa.array([], pa.string()), "row": pa.array([], pa.int64())})

    def joined() -> Iterator[pa.Table]:
        nonlocal matched
        for bucket in range(buckets):
            lines = read_bucket(work / "map", bucket)
            if lines is None:
                continue
            ids = read_bucket(work / "records", bucket)
            pairs = lines.join(
                no_records if ids is None else ids, keys="member", right_keys="id", join_type="left outer"
            )
            found = pairs.filter(pc.is_valid(pairs["row"]))
            matched += found.num_rows
            counts = found.group_by("member").aggregate([("cluster", "count_distinct")])
            two_clusters.update(counts.filter(pc.greater(counts["cluster_count_distinct"], 1))["member"].to_pylist())
            missed = pc.unique(pairs.filter(pc.is_null(pairs["row"]))["cluster"])  # counted among the map's clusters
            yield pa.concat_tables(
                [
                    found.select(["cluster", "row"]),
                    pa.table({"cluster": missed, "row": pa.array(np.full(len(missed), -1), pa.int64())}),
                ]
            )

    spill(joined(), lambda table: _range_bucket(table["cluster"], splitters), work / "clusters")
    return matched, two_clusters


def _write_csr(spilled: Path, ranges: int, rows: int, folder: Path, cluster_map: Path, source: str) -> int:
    """Sort each cluster range's pairs into the CSR arrays, appended to folder/{offsets,members}.npy; then every row
    in no cluster as a singleton. Returns the cluster count."""
    clustered = np.zeros(rows, dtype=bool)
    used = in_file = largest = total = 0
    with open(folder / "offsets.raw", "wb") as offsets, open(folder / "members.raw", "wb") as members:
        offsets.write(np.zeros(1, np.int64).tobytes())
        for part in range(ranges):
            table = read_bucket(spilled, part)
            if table is None:
                continue
            names = pc.dictionary_encode(table["cluster"].combine_chunks())
            in_file += len(names.dictionary)
            rank = np.empty(len(names.dictionary), dtype=np.int64)  # by name: draws do not depend on line order
            rank[pc.sort_indices(names.dictionary).to_numpy()] = np.arange(len(names.dictionary))
            hit = pc.greater_equal(table["row"], 0)
            codes, row = names.indices.filter(hit).to_numpy(), table["row"].filter(hit).to_numpy()
            named, member = np.divmod(np.unique(rank[codes] * rows + row), rows)  # a duplicated row counts once
            starts = np.flatnonzero(np.diff(named, prepend=-1))  # where each cluster's rows begin
            sizes = np.diff(np.append(starts, len(named)))
            offsets.write((total + np.cumsum(sizes)).astype(np.int64).tobytes())
            members.write(member.astype(np.int64).tobytes())
            clustered[member] = True
            used, total, largest = used + len(sizes), total + len(member), max(largest, int(sizes.max(initial=0)))
        for start in range(0, rows, ROW_CHUNK):  # unmapped sequences are kept, each as its own cluster
            alone = start + np.flatnonzero(~clustered[start : start + ROW_CHUNK])
            offsets.write((total + np.arange(1, len(alone) + 1)).astype(np.int64).tobytes())
            members.write(alone.astype(np.int64).tobytes())
            total += len(alone)
    singletons = rows - int(clustered.sum())
    clusters = used + singletons
    _npy(folder / "offsets.raw", folder / "offsets.npy", clusters + 1)
    _npy(folder / "members.raw", folder / "members.npy", total)
    if in_file > used:
        log.warning(
            "Cluster sampling: dropped %d of the %d clusters in %s, none of whose members is in %s",
            *(in_file - used, in_file, cluster_map, source),
        )
    log.info(
        "Cluster sampling: %d clusters (%d from %s, %d singletons of unmapped sequences) over %d sequences; "
        "largest cluster %d, mean %.2f members",
        *(clusters, used, cluster_map, singletons, rows, max(largest, 1 if singletons else 0), total / clusters),
    )
    return clusters


def _npy(raw: Path, out: Path, count: int) -> None:
    """`out`: the .npy file (np.save's bytes) of the `count` int64 values in `raw`; `raw` removed."""
    with open(out, "wb") as target, open(raw, "rb") as values:
        np.lib.format.write_array_header_1_0(target, {"descr": "<i8", "fortran_order": False, "shape": (count,)})
        shutil.copyfileobj(values, target, 1 << 24)
    raw.unlink()
