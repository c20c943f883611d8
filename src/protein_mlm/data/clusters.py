"""UniRef cluster sampling as ESM-2: each epoch draws every UniRef50 cluster once, with one random member.

ESM-2 (Lin et al. 2023) trains on UniRef90 sequences sampled by UniRef50 cluster: a cluster is drawn first,
then one of its members. We read that as: every epoch visits every cluster exactly once, in random order, with a
member drawn uniformly from the cluster, so each cluster is seen equally often however many members it has.
FASTA headers do not carry the UniRef50 cluster, hence a separate mapping file, in one of two formats:

- a two-column TSV, `cluster<TAB>member`, one member per line;
- UniProt's `idmapping_selected.tab` (22 tab-separated columns, one UniProtKB entry per line), whose column 9
  (1-based) is the entry's UniRef90 cluster and column 10 its UniRef50 cluster: the UniRef90 ids are the members.

Members are matched to the training rows by FASTA record id (the first word of the header). Exact duplicates
share one row, so a row keeps every record id it stands for; the ids are cached beside the Arrow data.
"""

import logging
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather

from protein_mlm.data.fasta import open_maybe_gzipped, read_fasta, sequence_digest
from protein_mlm.data.tokenizer import encode_residues
from protein_mlm.errors import DataError

log = logging.getLogger(__name__)

IDMAPPING_MEMBER_COLUMN, IDMAPPING_CLUSTER_COLUMN = 8, 9  # 0-based: UniRef90 and UniRef50 of idmapping_selected
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


def read_cluster_map(path: str | Path, wanted: set[str] | None = None) -> tuple[dict[str, list[str]], int]:
    """({cluster id: [member ids]}, clusters in the file); with `wanted`, only those members are kept (memory)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data.cluster_map={path} does not exist; pass a cluster<TAB>member TSV or idmapping_selected.tab"
        )
    clusters: dict[str, list[str]] = {}
    home: dict[str, tuple[str, int]] = {}  # member -> (its cluster, line), to reject a member in two clusters
    lines, all_clusters = 0, set()
    try:
        for line_no, cluster, member in _pairs(path):
            lines += 1
            all_clusters.add(cluster)
            if wanted is not None and member not in wanted:
                continue
            seen = home.get(member)
            if seen is None:
                home[member] = (cluster, line_no)
                clusters.setdefault(cluster, []).append(member)
            elif seen[0] != cluster:
                raise DataError(
                    f"{path}:{line_no}: member {member} is in cluster {cluster} here and in {seen[0]} on line "
                    f"{seen[1]}; each member must belong to one cluster"
                )
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} as a text cluster map ({e}); pass a plain or gzipped TSV") from None
    if not lines:
        raise DataError(
            f"{path} holds no cluster/member lines; pass a cluster<TAB>member TSV or idmapping_selected.tab"
        )
    return clusters, len(all_clusters)


def record_clusters(fasta: Path, cluster_map: Path) -> dict[str, str]:
    """{record id: cluster} for the records of `fasta` that the map names (to hold out whole clusters)."""
    wanted = {record_id for record_id, _ in read_fasta(fasta)}
    mapping, _ = read_cluster_map(cluster_map, wanted=wanted)
    return {member: cluster for cluster, members in mapping.items() for member in members}


def _row_key(token_ids: np.ndarray) -> bytes:
    return sequence_digest(token_ids.tobytes())


def row_record_ids(fasta: Path, sequences: datasets.Dataset) -> list[list[str]]:
    """The FASTA record ids each row of `sequences` stands for, matched by content (so any row order works)."""
    row_of: dict[bytes, int] = {}
    row = 0
    for chunk in sequences.data.column("input_ids").chunks:
        values = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
        ends = np.cumsum(pc.list_value_length(chunk).to_numpy(zero_copy_only=False))
        for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            row_of[_row_key(values[start:end])] = row
            row += 1
    ids: list[list[str]] = [[] for _ in range(row)]
    for record_id, residues in read_fasta(fasta):
        found = row_of.get(_row_key(encode_residues(residues))) if residues else None
        if found is not None:  # records of the other split (or empty ones) have no row here
            ids[found].append(record_id)
    return ids


def load_row_record_ids(fasta: Path, sequences: datasets.Dataset, cache_file: Path) -> list[list[str]]:
    """`row_record_ids`, computed once and kept as an Arrow file (one list of ids per row) beside the data cache."""
    if cache_file.is_file():
        ids = feather.read_table(cache_file).column("ids").to_pylist()
        if len(ids) == len(sequences):
            return ids
    ids = row_record_ids(fasta, sequences)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}-")
    os.close(fd)
    feather.write_feather(pa.table({"ids": pa.array(ids, type=pa.list_(pa.string()))}), tmp)
    os.replace(tmp, cache_file)  # atomic: a concurrent run reads the old file or the whole new one
    return ids


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
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        rng = np.random.default_rng([self.seed, epoch, CLUSTER_STREAM])
        rows = self.members[self.offsets[:-1] + rng.integers(np.diff(self.offsets))]
        self._last = (epoch, rows)
        return rows


def build_cluster_sampler(
    cluster_map: str | Path, row_ids: list[list[str]], seed: int, source: str = "the training FASTA"
) -> ClusterSampler:
    """Group dataset rows by the clusters of their record ids; rows in no cluster become singleton clusters."""
    row_of = {record_id: row for row, ids in enumerate(row_ids) for record_id in ids}
    mapping, in_file = read_cluster_map(cluster_map, wanted=set(row_of))
    groups, clustered = [], np.zeros(len(row_ids), dtype=bool)
    for cluster in sorted(mapping):  # sorted: the draws do not depend on the mapping file's line order
        rows = sorted({row_of[m] for m in mapping[cluster]})  # duplicates of one sequence count once
        groups.append(rows)
        clustered[rows] = True
    if not groups:
        example = next((ids[0] for ids in row_ids if ids), "?")
        raise DataError(
            f"no member id in {cluster_map} is a record id of {source} (e.g. {example!r}); the members must be the "
            "FASTA's record ids (the first word of each header, e.g. UniRef90_P12345)"
        )
    if in_file > len(mapping):
        log.warning(
            "Cluster sampling: dropped %d of the %d clusters in %s, none of whose members is in %s",
            in_file - len(mapping),
            in_file,
            cluster_map,
            source,
        )
    singletons = np.flatnonzero(~clustered)
    groups += [[int(r)] for r in singletons]  # unmapped sequences are kept, each as its own cluster
    sizes = np.array([len(g) for g in groups])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    members = np.fromiter((r for g in groups for r in g), dtype=np.int64, count=int(offsets[-1]))
    log.info(
        "Cluster sampling: %d clusters (%d from %s, %d singletons of unmapped sequences) over %d sequences; "
        "largest cluster %d, mean %.2f members",
        len(groups),
        len(groups) - len(singletons),
        cluster_map,
        len(singletons),
        len(row_ids),
        sizes.max(),
        sizes.mean(),
    )
    return ClusterSampler(offsets=offsets, members=members, seed=seed)
