"""Write a synthetic UniRef50 -> UniRef90 cluster map (cluster<TAB>member TSV), fast, for measuring cluster maps.

    python scripts/make_cluster_map.py map.tsv --clusters 65000000 --members 187000000

Every cluster gets one member, and the remaining members go to clusters drawn with a heavy tail (cluster
floor(C * u^3) for uniform u), so a few clusters are large and most hold one to three members, as in UniRef50.
Members are `UniRef90_<n>` (n = 0 .. members-1), clusters `UniRef50_<c>`; lines are grouped by cluster, as UniProt
writes them. The text is assembled with numpy and pyarrow a chunk at a time, no Python loop per line.

With `--cache-only`, `out` is a cluster cache folder instead: the CSR arrays a first read of that map would cache
for training rows in a random order (members[offsets[c]:offsets[c+1]] are cluster c's rows), written directly, so
a cached load can be measured at full size on a machine where the first read would not fit:

    python scripts/make_cluster_map.py /tmp/full.clusters --cache-only
    python scripts/cluster_map_cost.py - --rows 187000000 --cache /tmp/full.clusters --phase cached
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protein_mlm.data.clusters import write_cluster_cache

CHUNK_LINES = 4_000_000  # lines assembled at a time: bounds memory at any size


def cluster_of_members(clusters: int, members: int, seed: int) -> np.ndarray:
    """The cluster of every member, sorted (lines grouped by cluster); every cluster non-empty."""
    rng = np.random.default_rng(seed)
    extra = (clusters * rng.random(members - clusters) ** 3).astype(np.int64)
    return np.sort(np.concatenate([np.arange(clusters, dtype=np.int64), extra]))


def lines(cluster: np.ndarray, first_member: int) -> pa.Buffer:
    """`UniRef50_<c>\\tUniRef90_<m>\\n` for a chunk, as one buffer."""
    member = pa.array(np.arange(first_member, first_member + len(cluster)))
    text = pc.binary_join_element_wise(
        "UniRef50_", pc.cast(pa.array(cluster), pa.string()), "\tUniRef90_", pc.cast(member, pa.string()), "\n", ""
    )
    return text.buffers()[2][: pc.sum(pc.binary_length(text)).as_py()]  # the concatenated lines, no copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output TSV; gzipped (level 1) when it ends in .gz")
    parser.add_argument("--clusters", type=int, default=65_000_000, help="UniRef50 clusters")
    parser.add_argument("--members", type=int, default=187_000_000, help="UniRef90 members (>= clusters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-only", action="store_true", help="write the cached CSR arrays, not the TSV")
    args = parser.parse_args()
    if args.members < args.clusters:
        parser.error("--members must be at least --clusters (every cluster has a member)")
    cluster = cluster_of_members(args.clusters, args.members, args.seed)
    if args.cache_only:
        offsets = np.searchsorted(cluster, np.arange(args.clusters + 1))  # cluster is sorted: CSR boundaries
        del cluster
        members = np.random.default_rng(args.seed + 1).permutation(args.members)
        write_cluster_cache(args.out, offsets, members, rows=args.members)
        print(f"wrote the cache {args.out}: {args.clusters} clusters, {args.members} members")
        return
    opener = (lambda p: gzip.open(p, "wb", compresslevel=1)) if args.out.suffix == ".gz" else (lambda p: open(p, "wb"))
    with opener(args.out) as out:
        for start in range(0, args.members, CHUNK_LINES):
            out.write(lines(cluster[start : start + CHUNK_LINES], start))
    print(f"wrote {args.out}: {args.clusters} clusters, {args.members} members")


if __name__ == "__main__":
    main()
