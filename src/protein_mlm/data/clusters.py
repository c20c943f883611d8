"""UniRef cluster sampling as ESM-2: each epoch draws every UniRef50 cluster once, with one random member.

ESM-2 (Lin et al. 2023) trains on UniRef90 sequences sampled by UniRef50 cluster: a cluster is drawn first,
then one of its members. We read that as: every epoch visits every cluster exactly once, in random order, with a
member drawn uniformly from the cluster, so each cluster is seen equally often however many members it has.
FASTA headers do not carry the UniRef50 cluster, hence a separate mapping file, in one of two formats:

- a two-column TSV, `cluster<TAB>member`, one member per line;
- UniProt's `idmapping_selected.tab` (22 tab-separated columns, one UniProtKB entry per line), whose column 9
  (1-based) is the entry's UniRef90 cluster and column 10 its UniRef50 cluster: the UniRef90 ids are the members.

Members are matched to the training rows by record id (a FASTA header's first word, a Parquet `id`). Exact
duplicates share one row, so a row stands for every record id it holds. The map is read once, streamed through
pyarrow's CSV reader a block at a time (the line-by-line pass below runs only to name the line of an error), and
joined to the rows out of core: map lines and record ids are spilled to disk in buckets by a hash of the member id
and joined one bucket at a time, the matched (cluster, row) pairs spilled again in ranges of cluster names and
sorted one range at a time, so memory stays flat with the map's size. The result is kept beside the Arrow data as
two integer arrays in CSR form (cluster c owns members[offsets[c]:offsets[c+1]], rows of the training split),
memory-mapped by every later run and rank.
"""

import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.dataset as ds

from protein_mlm.data.fasta import open_maybe_gzipped, sequence_digest
from protein_mlm.data.readers import parse_workers, read_sequences
from protein_mlm.data.tokenizer import encode_residues
from protein_mlm.errors import DataError

log = logging.getLogger(__name__)

IDMAPPING_MEMBER_COLUMN, IDMAPPING_CLUSTER_COLUMN = 8, 9  # 0-based: UniRef90 and UniRef50 of idmapping_selected
CSV_BLOCK_BYTES = 64 << 20  # pyarrow parses the map in blocks of this size, on all cores
MATCH_RECORDS = 1_000_000  # records hashed and matched to rows at a time (bounded memory on a first read)
BUCKET_LINES = 2_000_000  # map lines (or records) per spilled bucket: each join and sort holds about this many
SAMPLE_EVERY = 64  # one map line in this many gives a cluster name to place the range buckets' boundaries
QUEUED_ROWS = 1 << 21  # rows pyarrow's dataset writer may hold before the producer waits (bounded memory)
DRAW_CLUSTERS = 1 << 22  # clusters drawn at a time: an epoch's temporaries stay small at 65M clusters
CLUSTER_STREAM = 0xC1057E5  # keeps the member draws independent of the batch sampler's (seed, epoch) stream


def _pairs(path: Path):
    """(line number, cluster, member) for every mapping line, in either format; blank and '#' lines skipped."""
    columns = None  # 2 = cluster<TAB>member, else idmapping_selected.tab
    with open_maybe_gzipped(path, text=True) as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if columns is None:
                columns = 2 if len(fields) == 2 else len(fields)
                if columns != 2 and columns <= IDMAPPING_CLUSTER_COLUMN:
                    raise DataError(
                        f"{path}:{line_no}: {len(fields)} tab-separated columns; a cluster map is `cluster<TAB>member` "
                        "(2 columns) or UniProt's idmapping_selected.tab (UniRef90 in column 9, UniRef50 in column 10)"
                    )
            if columns == 2:
                if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                    raise DataError(f"{path}:{line_no}: expected `cluster<TAB>member`, got {line[:80]!r}")
                yield line_no, fields[0].strip(), fields[1].strip()
            else:
                if len(fields) <= IDMAPPING_CLUSTER_COLUMN:
                    raise DataError(
                        f"{path}:{line_no}: {len(fields)} columns where idmapping_selected.tab has {columns}; "
                        "is the file truncated or mixed with another format?"
                    )
                member, cluster = fields[IDMAPPING_MEMBER_COLUMN].strip(), fields[IDMAPPING_CLUSTER_COLUMN].strip()
                if member and cluster:  # an entry without UniRef clusters cannot be sampled by cluster
                    yield line_no, cluster, member


def _check_lines(path: Path, wanted: set[str] | None = None) -> None:
    """The line-by-line reading of the map, run only after the fast reader refused it: raises the DataError that
    names the first bad line (a malformed line, a member in two clusters, an unreadable file)."""
    home: dict[str, tuple[str, int]] = {}  # member -> (its cluster, line)
    try:
        for line_no, cluster, member in _pairs(path):
            if wanted is not None and member not in wanted:
                continue
            seen = home.setdefault(member, (cluster, line_no))
            if seen[0] != cluster:
                raise DataError(
                    f"{path}:{line_no}: member {member} is in cluster {cluster} here and in {seen[0]} on line "
                    f"{seen[1]}; each member must belong to one cluster"
                )
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} as a text cluster map ({e}); pass a plain or gzipped TSV") from None


def _head_columns(path: Path) -> int:
    """Tab-separated fields on the first data line (0 when there is none): tells the two formats apart."""
    try:
        with open_maybe_gzipped(path, text=True) as handle:
            for line in handle:
                line = line.rstrip("\r\n")
                if line.strip() and not line.startswith("#"):
                    return len(line.split("\t"))
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):
        _check_lines(path)
    return 0


def _read_blocks(path: Path, columns: int) -> Iterator[pa.Table]:
    """The raw (first, member, cluster) fields of every well-formed line, a block at a time (pyarrow's streaming
    CSV reader: memory holds one block, whatever the file's size)."""
    names = [f"f{i}" for i in range(columns)]
    member, cluster = ("f1", "f0") if columns == 2 else (f"f{IDMAPPING_MEMBER_COLUMN}", f"f{IDMAPPING_CLUSTER_COLUMN}")
    keep = list(dict.fromkeys(["f0", member, cluster]))

    def skip_comment(row) -> str:  # a comment or blank line of another width; anything else is an error
        return "skip" if row.text.startswith("#") or not row.text.strip() else "error"

    with open_maybe_gzipped(path) as handle:
        reader = csv.open_csv(
            handle,
            read_options=csv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=skip_comment),
            convert_options=csv.ConvertOptions(
                include_columns=keep, column_types=dict.fromkeys(keep, pa.string()), strings_can_be_null=False
            ),
        )
        for batch in reader:
            yield pa.table({"first": batch["f0"], "member": batch[member], "cluster": batch[cluster]})


def _map_blocks(path: Path) -> Iterator[pa.Table]:
    """The map's (cluster, member) pairs in file order, a block at a time; a malformed line raises the DataError
    that names it."""
    columns = _head_columns(path)
    if not columns:
        return
    if columns != 2 and columns <= IDMAPPING_CLUSTER_COLUMN:
        _refuse(path)
    try:
        for block in _read_blocks(path, columns):
            table = _clean(block, columns)
            if table is None:
                _refuse(path)
            yield table
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error):
        _refuse(path)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(
            f"data.cluster_map={path} does not exist; pass a cluster<TAB>member TSV or idmapping_selected.tab"
        )


def _refuse(path: Path) -> None:
    """Raise the DataError naming the bad line of a map the fast reader refused."""
    _check_lines(path)
    raise DataError(f"cannot read {path} as a cluster map; pass a cluster<TAB>member TSV or idmapping_selected.tab")


def _no_lines(path: Path) -> DataError:
    return DataError(f"{path} holds no cluster/member lines; pass a cluster<TAB>member TSV or idmapping_selected.tab")


def read_cluster_table(path: str | Path) -> pa.Table:
    """The map as a table of (cluster, member) strings in file order, comment and blank lines dropped."""
    path = Path(path)
    _check_exists(path)
    blocks = list(_map_blocks(path))
    if not sum(block.num_rows for block in blocks):
        raise _no_lines(path)
    return pa.concat_tables(blocks)


def match_records(cluster_map: Path, records: pa.Table) -> tuple[pa.Table, pa.Array, int]:
    """Join `records` (id, ...) to the map by member id in memory: (the matched records with a `cluster` column
    indexing the names, the cluster names, clusters in the file). For record sets that fit in memory (the
    held-out split); the training arrays are built out of core by `cluster_arrays`."""
    table = read_cluster_table(cluster_map)
    clusters = pc.dictionary_encode(table["cluster"].combine_chunks())
    map_ids = pa.table({"member": table["member"], "cluster": clusters.indices})
    joined = records.join(map_ids, keys="id", right_keys="member", join_type="inner")
    if _member_in_two_clusters(joined):
        _check_lines(cluster_map, set(joined["id"].to_pylist()))  # names the line (a member in two clusters)
    return joined, clusters.dictionary, len(clusters.dictionary)


def _clean(table: pa.Table, columns: int) -> pa.Table | None:
    """Drop comment and blank lines, trim the fields; None when a two-column line lacks a field (an error)."""
    first = table["first"]
    table = table.filter(pc.invert(pc.starts_with(first, "#")))
    cluster, member = pc.utf8_trim_whitespace(table["cluster"]), pc.utf8_trim_whitespace(table["member"])
    empty_cluster, empty_member = pc.equal(cluster, ""), pc.equal(member, "")
    if columns == 2:
        blank = pc.and_(empty_cluster, empty_member)  # a line of whitespace only, skipped as a blank line
        if pc.any(pc.and_(pc.invert(blank), pc.or_(empty_cluster, empty_member))).as_py():
            return None
        keep = pc.invert(blank)
    else:  # an entry without UniRef clusters cannot be sampled by cluster
        keep = pc.invert(pc.or_(empty_cluster, empty_member))
    return pa.table({"cluster": cluster, "member": member}).filter(keep)


def _member_in_two_clusters(joined: pa.Table) -> bool:
    """Whether a matched id has two clusters (ids are unique among records, so two lines of one id are a pair)."""
    if joined.num_rows < 2:
        return False
    ids = pc.dictionary_encode(joined["id"].combine_chunks()).indices.to_numpy().astype(np.int64)
    pairs = np.sort(ids * (1 << 32) + joined["cluster"].to_numpy())
    ids, first = pairs >> 32, np.concatenate([[True], pairs[1:] != pairs[:-1]])
    return bool(np.any(ids[first][1:] == ids[first][:-1]))


def record_clusters(path: Path, cluster_map: Path) -> dict[str, str]:
    """{record id: cluster} for the records of `path` that the map names (to hold out whole clusters)."""
    ids = list(dict.fromkeys(record_id for record_id, _ in read_sequences(path)))
    joined, names, _ = match_records(cluster_map, pa.table({"id": pa.array(ids, pa.string())}))
    return dict(zip(joined["id"].to_pylist(), pc.take(names, joined["cluster"]).to_pylist()))


def _row_digests(sequences: datasets.Dataset) -> np.ndarray:
    """The content digest of every row of `sequences` (S16), in row order."""
    digests = []
    for chunk in sequences.data.column("input_ids").chunks:
        values = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
        ends = np.cumsum(pc.list_value_length(chunk).to_numpy(zero_copy_only=False))
        starts = np.concatenate([[0], ends[:-1]])
        digests += [sequence_digest(values[start:end].tobytes()) for start, end in zip(starts, ends)]
    return np.array(digests, dtype="S16")


def row_record_ids(path: Path, sequences: datasets.Dataset) -> Iterator[pa.Table]:
    """(id, row) tables, a chunk of records at a time: the record ids of `path` each row of `sequences` stands for,
    matched by content digest."""
    digests = _row_digests(sequences)
    order = np.argsort(digests, kind="stable")
    digests = digests[order]  # sorted once; row order[i] has digest digests[i]
    ids, keys = [], []

    def match() -> pa.Table:  # one vectorised lookup per chunk of records
        wanted = np.array(keys, "S16")
        found = np.minimum(np.searchsorted(digests, wanted), len(order) - 1)
        hit = digests[found] == wanted
        return pa.table({"id": pa.array(ids, pa.string()).filter(hit), "row": order[found[hit]].astype(np.int64)})

    for record_id, residues in read_sequences(path, workers=parse_workers()):
        if residues:  # records of the other split (or empty ones) have no row here
            ids.append(record_id)
            keys.append(sequence_digest(encode_residues(residues).tobytes()))
        if len(ids) >= MATCH_RECORDS:
            if len(order):
                yield match()
            ids, keys = [], []
    if ids and len(order):
        yield match()


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


def cluster_arrays(cluster_map: Path, records: Iterable[pa.Table], rows: int, source: str, folder: Path) -> int:
    """Write offsets.npy and members.npy into `folder`: the rows of each mapped cluster (clusters in name order, rows
    ascending, each once), then every row in no cluster as a singleton; returns the cluster count. Out of core:
    memory holds about one bucket (BUCKET_LINES lines) and a flag per row, whatever the map's size."""
    cluster_map = Path(cluster_map)
    _check_exists(cluster_map)
    blocks = _map_blocks(cluster_map)
    with tempfile.TemporaryDirectory(dir=folder, prefix="spill-") as spill:
        spill = Path(spill)
        buckets = _member_buckets(cluster_map, rows)
        lines, sample = _spill_map(blocks, buckets, spill / "map")
        if not lines:
            raise _no_lines(cluster_map)
        example = _spill(records, lambda table: _hash_bucket(table["id"], buckets), spill / "records")
        splitters = _splitters(sample, math.ceil(lines / BUCKET_LINES))
        matched, two_clusters = _join_buckets(spill, buckets, splitters)
        if two_clusters:
            _check_lines(cluster_map, two_clusters)  # names the line (a member in two clusters)
        if not matched:
            raise DataError(
                f"no member id in {cluster_map} is a record id of {source} (e.g. {example or '?'!r}); the members "
                "must be the record ids (the first word of each FASTA header, e.g. UniRef90_P12345, or a Parquet `id`)"
            )
        return _write_csr(spill / "clusters", len(splitters) + 1, rows, folder, cluster_map, source)


def _member_buckets(cluster_map: Path, rows: int) -> int:
    """Buckets of the member join: about BUCKET_LINES map lines (guessed from the file's size) or rows in each."""
    size = cluster_map.stat().st_size * (4 if cluster_map.suffix == ".gz" else 1)  # gzip shrinks text ~4x
    return max(1, min(1024, math.ceil(max(size / (40 * BUCKET_LINES), rows / BUCKET_LINES))))  # ~40 bytes a line


def _hash_bucket(strings: pa.ChunkedArray, buckets: int) -> np.ndarray:
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


def _spill(tables: Iterable[pa.Table], bucket_of, folder: Path) -> str | None:
    """Write `tables` to disk partitioned by `bucket_of(table)` (folder/<bucket>/*.arrow), streamed through pyarrow's
    dataset writer; returns the first value of the first column (for error messages), None when there is none."""
    tables = (table for table in tables if table.num_rows)
    first = next(tables, None)
    if first is None:
        return None

    def batches() -> Iterator[pa.RecordBatch]:
        for table in itertools.chain([first], tables):
            yield from table.append_column("bucket", pa.array(bucket_of(table))).to_batches()

    ds.write_dataset(
        pa.RecordBatchReader.from_batches(first.schema.append(pa.field("bucket", pa.int32())), batches()),
        folder,
        format="arrow",
        partitioning=ds.partitioning(pa.schema([("bucket", pa.int32())])),
        existing_data_behavior="overwrite_or_ignore",
    )
    return first.column(0)[0].as_py()


def _read_bucket(folder: Path, bucket: int) -> pa.Table | None:
    """One spilled bucket; None when nothing landed in it."""
    part = folder / str(bucket)
    return ds.dataset(part, format="arrow").to_table() if part.is_dir() else None


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

    _spill(counted(), lambda table: _hash_bucket(table["member"], buckets), folder)
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


def _join_buckets(spill: Path, buckets: int, splitters: np.ndarray) -> tuple[int, set[str]]:
    """Join each member bucket's map lines to its records; spill the matched (cluster, row) pairs, and (cluster, -1)
    for each cluster with a line that matched no record, by cluster range. Returns (matched lines, ids found in two
    clusters)."""
    matched, two_clusters = 0, set()
    no_records = pa.table({"id": pa.array([], pa.string()), "row": pa.array([], pa.int64())})

    def joined() -> Iterator[pa.Table]:
        nonlocal matched
        for bucket in range(buckets):
            lines = _read_bucket(spill / "map", bucket)
            if lines is None:
                continue
            ids = _read_bucket(spill / "records", bucket)
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

    _spill(joined(), lambda table: _range_bucket(table["cluster"], splitters), spill / "clusters")
    return matched, two_clusters


def _write_csr(spilled: Path, ranges: int, rows: int, folder: Path, cluster_map: Path, source: str) -> int:
    """Sort each cluster range's pairs into the CSR arrays, appended to folder/{offsets,members}.npy; then every row
    in no cluster as a singleton. Returns the cluster count."""
    clustered = np.zeros(rows, dtype=bool)
    used = in_file = largest = total = 0
    with open(folder / "offsets.raw", "wb") as offsets, open(folder / "members.raw", "wb") as members:
        offsets.write(np.zeros(1, np.int64).tobytes())
        for part in range(ranges):
            table = _read_bucket(spilled, part)
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
        for start in range(0, rows, DRAW_CLUSTERS):  # unmapped sequences are kept, each as its own cluster
            alone = start + np.flatnonzero(~clustered[start : start + DRAW_CLUSTERS])
            offsets.write((total + np.arange(1, len(alone) + 1)).astype(np.int64).tobytes())
            members.write(alone.astype(np.int64).tobytes())
            total += len(alone)
    clusters, singletons = used + rows - int(clustered.sum()), rows - int(clustered.sum())
    _npy(folder / "offsets.raw", folder / "offsets.npy", clusters + 1)
    _npy(folder / "members.raw", folder / "members.npy", total)
    if in_file > used:
        log.warning(
            "Cluster sampling: dropped %d of the %d clusters in %s, none of whose members is in %s",
            in_file - used,
            in_file,
            cluster_map,
            source,
        )
    log.info(
        "Cluster sampling: %d clusters (%d from %s, %d singletons of unmapped sequences) over %d sequences; "
        "largest cluster %d, mean %.2f members",
        clusters,
        used,
        cluster_map,
        singletons,
        rows,
        max(largest, 1 if singletons else 0),
        total / clusters,
    )
    return clusters


def _npy(raw: Path, out: Path, count: int) -> None:
    """`out`: the .npy file (np.save's bytes) of the `count` int64 values in `raw`; `raw` removed."""
    with open(out, "wb") as target, open(raw, "rb") as values:
        np.lib.format.write_array_header_1_0(target, {"descr": "<i8", "fortran_order": False, "shape": (count,)})
        shutil.copyfileobj(values, target, 1 << 24)
    raw.unlink()


def load_cluster_sampler(
    cluster_map: Path, path: Path, sequences: datasets.Dataset, cache: Path, seed: int
) -> ClusterSampler:
    """The cluster sampler of `sequences` (read from `path`), its arrays built once into `cache` and memory-mapped."""
    arrays = open_cluster_cache(cache, len(sequences))
    if arrays is None:
        records = row_record_ids(path, sequences)
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
