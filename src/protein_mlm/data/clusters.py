"""UniRef cluster sampling as ESM-2: each epoch draws every UniRef50 cluster once, with one random member.

ESM-2 (Lin et al. 2023) trains on UniRef90 sequences sampled by UniRef50 cluster: a cluster is drawn first,
then one of its members. We read that as: every epoch visits every cluster exactly once, in random order, with a
member drawn uniformly from the cluster, so each cluster is seen equally often however many members it has.
FASTA headers do not carry the UniRef50 cluster, hence a separate mapping file, in one of two formats:

- a two-column TSV, `cluster<TAB>member`, one member per line;
- UniProt's `idmapping_selected.tab` (22 tab-separated columns, one UniProtKB entry per line), whose column 9
  (1-based) is the entry's UniRef90 cluster and column 10 its UniRef50 cluster: the UniRef90 ids are the members.

Members are matched to the training rows by record id (a FASTA header's first word, a Parquet `id`). Exact
duplicates share one row, so a row stands for every record id it holds. The map is read once with pyarrow's CSV
reader (the line-by-line pass below runs only to name the line of an error), matched to the rows by a hash join,
and kept beside the Arrow data as two integer arrays in CSR form (cluster c owns members[offsets[c]:offsets[c+1]],
rows of the training split), memory-mapped by every later run and rank.
"""

import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from protein_mlm.alphabet import encode_residues
from protein_mlm.data.fasta import open_maybe_gzipped, sequence_digest
from protein_mlm.data.readers import parse_workers, read_sequences
from protein_mlm.errors import DataError

log = logging.getLogger(__name__)

IDMAPPING_MEMBER_COLUMN, IDMAPPING_CLUSTER_COLUMN = 8, 9  # 0-based: UniRef90 and UniRef50 of idmapping_selected
CSV_BLOCK_BYTES = 64 << 20  # pyarrow parses the map in blocks of this size, on all cores
MATCH_RECORDS = 1_000_000  # records hashed and matched to rows at a time (bounded memory on a first read)
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


def _read_columns(path: Path, columns: int) -> pa.Table:
    """The raw (first, member, cluster) fields of every well-formed line, parsed by pyarrow on all cores."""
    names = [f"f{i}" for i in range(columns)]
    member, cluster = ("f1", "f0") if columns == 2 else (f"f{IDMAPPING_MEMBER_COLUMN}", f"f{IDMAPPING_CLUSTER_COLUMN}")
    keep = list(dict.fromkeys(["f0", member, cluster]))

    def skip_comment(row) -> str:  # a comment or blank line of another width; anything else is an error
        return "skip" if row.text.startswith("#") or not row.text.strip() else "error"

    with open_maybe_gzipped(path) as handle:
        table = csv.read_csv(
            handle,
            read_options=csv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=skip_comment),
            convert_options=csv.ConvertOptions(
                include_columns=keep, column_types=dict.fromkeys(keep, pa.string()), strings_can_be_null=False
            ),
        )
    return pa.table({"first": table["f0"], "member": table[member], "cluster": table[cluster]})


def read_cluster_table(path: str | Path) -> pa.Table:
    """The map as a table of (cluster, member) strings in file order, comment and blank lines dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data.cluster_map={path} does not exist; pass a cluster<TAB>member TSV or idmapping_selected.tab"
        )
    table = _fast_read(path)
    if table is None:
        _check_lines(path)  # names the bad line
        raise DataError(f"cannot read {path} as a cluster map; pass a cluster<TAB>member TSV or idmapping_selected.tab")
    if not table.num_rows:
        raise DataError(
            f"{path} holds no cluster/member lines; pass a cluster<TAB>member TSV or idmapping_selected.tab"
        )
    return table


def match_records(cluster_map: Path, records: pa.Table) -> tuple[pa.Table, pa.Array, int]:
    """Join `records` (id, ...) to the map by member id: (the matched records with a `cluster` column indexing
    the names, the cluster names, clusters in the file). A hash join, no Python loop per line."""
    table = read_cluster_table(cluster_map)
    clusters = pc.dictionary_encode(table["cluster"].combine_chunks())
    map_ids = pa.table({"member": table["member"], "cluster": clusters.indices})
    joined = records.join(map_ids, keys="id", right_keys="member", join_type="inner")
    if _member_in_two_clusters(joined):
        _check_lines(cluster_map, set(joined["id"].to_pylist()))  # names the line (a member in two clusters)
    return joined, clusters.dictionary, len(clusters.dictionary)


def _fast_read(path: Path) -> pa.Table | None:
    """The map's (cluster, member) pairs; None when a line is malformed (the line-by-line check then names it)."""
    columns = _head_columns(path)
    if not columns:
        return pa.table({"cluster": pa.array([], pa.string()), "member": pa.array([], pa.string())})
    if columns != 2 and columns <= IDMAPPING_CLUSTER_COLUMN:
        return None
    try:
        return _clean(_read_columns(path, columns), columns)
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error):
        return None


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


def row_record_ids(path: Path, sequences: datasets.Dataset) -> pa.Table:
    """(id, row): the record ids of `path` each row of `sequences` stands for, matched by content digest."""
    digests = _row_digests(sequences)
    order = np.argsort(digests, kind="stable")
    parts, ids, keys = [], [], []

    def match() -> None:  # one vectorised lookup per chunk of records
        found = order[np.minimum(np.searchsorted(digests[order], np.array(keys, "S16")), len(order) - 1)]
        hit = digests[found] == np.array(keys, "S16")
        parts.append(pa.table({"id": pa.array(ids, pa.string()).filter(hit), "row": found[hit].astype(np.int64)}))

    for record_id, residues in read_sequences(path, workers=parse_workers()):
        if residues:  # records of the other split (or empty ones) have no row here
            ids.append(record_id)
            keys.append(sequence_digest(encode_residues(residues).tobytes()))
        if len(ids) >= MATCH_RECORDS:
            match()
            ids, keys = [], []
    if ids and len(order):
        match()
    empty = pa.table({"id": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
    return pa.concat_tables(parts) if parts else empty


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


def cluster_arrays(cluster_map: Path, records: pa.Table, rows: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, members): the rows of each mapped cluster (clusters in name order, rows ascending, each once),
    then every row in no cluster as a singleton; a hash join and sorts, no Python loop per member."""
    joined, names, in_file = match_records(cluster_map, records)
    if not joined.num_rows:
        example = records["id"][0].as_py() if records.num_rows else "?"
        raise DataError(
            f"no member id in {cluster_map} is a record id of {source} (e.g. {example!r}); the members must be the "
            "record ids (the first word of each FASTA header, e.g. UniRef90_P12345, or a Parquet `id`)"
        )
    rank = np.empty(len(names), dtype=np.int64)  # by name: the draws do not depend on the file's line order
    rank[pc.sort_indices(names).to_numpy()] = np.arange(len(names))
    pairs = np.sort(rank[joined["cluster"].to_numpy()] * rows + joined["row"].to_numpy())
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])]  # a duplicated sequence counts once
    named, members = np.divmod(pairs, rows)
    starts = np.concatenate([[True], named[1:] != named[:-1]])  # clusters without a matched member are dropped
    used = int(starts.sum())
    clustered = np.zeros(rows, dtype=bool)
    clustered[members] = True
    singletons = np.flatnonzero(~clustered)  # unmapped sequences are kept, each as its own cluster
    sizes = np.concatenate([np.diff(np.flatnonzero(np.append(starts, True))), np.ones(len(singletons), np.int64)])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
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
        len(sizes),
        used,
        cluster_map,
        len(singletons),
        rows,
        sizes.max(),
        sizes.mean(),
    )
    return offsets, np.concatenate([members, singletons]).astype(np.int64)


def load_cluster_sampler(
    cluster_map: Path, path: Path, sequences: datasets.Dataset, cache: Path, seed: int
) -> ClusterSampler:
    """The cluster sampler of `sequences` (read from `path`), its arrays built once into `cache` and memory-mapped."""
    arrays = open_cluster_cache(cache, len(sequences))
    if arrays is None:
        records = row_record_ids(path, sequences)
        offsets, members = cluster_arrays(cluster_map, records, len(sequences), source=str(path))
        write_cluster_cache(cache, offsets, members, rows=len(sequences))
        arrays = open_cluster_cache(cache, len(sequences))
    return ClusterSampler(offsets=arrays[0], members=arrays[1], seed=seed)


def open_cluster_cache(cache: Path, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, members) memory-mapped from `cache`; None when it is absent or was built for another row count."""
    meta = cache / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("rows") != rows:
        return None
    return np.load(cache / "offsets.npy", mmap_mode="r"), np.load(cache / "members.npy", mmap_mode="r")


def write_cluster_cache(cache: Path, offsets: np.ndarray, members: np.ndarray, rows: int) -> None:
    """Write the arrays beside the target and rename: a concurrent run reads the old cache or the whole new one."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-{os.getpid()}-"))
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "members.npy", members)
    (tmp / "meta.json").write_text(json.dumps({"rows": rows, "clusters": len(offsets) - 1}))
    shutil.rmtree(cache, ignore_errors=True)  # a stale cache (another row count) of the same key
    try:
        os.rename(tmp, cache)
    except OSError:  # another process won the race; its copy is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
