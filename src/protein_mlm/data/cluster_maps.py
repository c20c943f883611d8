"""Cluster map files: UniProt's idmapping_selected.tab or a cluster<TAB>member TSV, read with pyarrow's streaming
CSV reader a block at a time; the line-by-line pass runs only to name the line of an error.

- a two-column TSV, `cluster<TAB>member`, one member per line;
- UniProt's `idmapping_selected.tab` (22 tab-separated columns, one UniProtKB entry per line), whose column 9
  (1-based) is the entry's UniRef90 cluster and column 10 its UniRef50 cluster: the UniRef90 ids are the members.
"""

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from protein_mlm.data.fasta import open_maybe_gzipped
from protein_mlm.data.readers import read_sequences
from protein_mlm.errors import DataError

IDMAPPING_MEMBER_COLUMN, IDMAPPING_CLUSTER_COLUMN = 8, 9  # 0-based: UniRef90 and UniRef50 of idmapping_selected
CSV_BLOCK_BYTES = 4 << 20  # pyarrow parses the map in blocks of this size; its streaming reader reads ~40 ahead


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


def check_lines(path: Path, wanted: set[str] | None = None) -> None:
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
        check_lines(path)
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


def map_blocks(path: Path) -> Iterator[pa.Table]:
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


def check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(
            f"data.cluster_map={path} does not exist; pass a cluster<TAB>member TSV or idmapping_selected.tab"
        )


def _refuse(path: Path) -> None:
    """Raise the DataError naming the bad line of a map the fast reader refused."""
    check_lines(path)
    raise DataError(f"cannot read {path} as a cluster map; pass a cluster<TAB>member TSV or idmapping_selected.tab")


def no_lines(path: Path) -> DataError:
    return DataError(f"{path} holds no cluster/member lines; pass a cluster<TAB>member TSV or idmapping_selected.tab")


def read_cluster_table(path: str | Path) -> pa.Table:
    """The map as a table of (cluster, member) strings in file order, comment and blank lines dropped."""
    path = Path(path)
    check_exists(path)
    blocks = list(map_blocks(path))
    if not sum(block.num_rows for block in blocks):
        raise no_lines(path)
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
        check_lines(cluster_map, set(joined["id"].to_pylist()))  # names the line (a member in two clusters)
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
