"""What a cluster map costs: its first read into CSR arrays, and every later (cached, memory-mapped) load.

    python scripts/make_cluster_map.py /tmp/map.tsv --clusters 2000000 --members 6000000
    python scripts/cluster_map_cost.py /tmp/map.tsv --rows 6000000

Each phase runs in a fresh process, so its peak RSS is its own, and prints one JSON line:
- `first`: read the map (pyarrow CSV), join it to the rows' record ids, build the CSR arrays, write the cache;
- `cached`: memory-map the cache (what every rank of every later run does), then draw one epoch's members.
The rows' record ids are given a chunk at a time (row r is `UniRef90_<p(r)>` for p(r) = (a r + 1) mod rows, a
permutation of the members that needs no memory), as `clusters.row_record_ids` yields them; hashing the training
rows to find them is a cost of preprocessing and is not measured here.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protein_mlm.data.clusters import ClusterSampler, build_cluster_cache, open_cluster_cache


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


CHUNK_ROWS = 1_000_000  # record ids made at a time, as row_record_ids yields them


def records(rows: int):
    """(id, row) tables for every row, a chunk at a time; the ids a permutation of the map's members."""
    step = next(a for a in range(int(rows * 0.618) | 1, 2 * rows + 2) if math.gcd(a, rows) == 1)
    for start in range(0, rows, CHUNK_ROWS):
        row = np.arange(start, min(start + CHUNK_ROWS, rows), dtype=np.int64)
        member = (row * step + 1) % rows  # int64: step * rows < 2**63 up to 3e9 rows
        ids = pc.binary_join_element_wise("UniRef90_", pc.cast(pa.array(member), pa.string()), "")
        yield pa.table({"id": ids, "row": row})


def first(cluster_map: Path, rows: int, cache: Path) -> dict:
    start_rss, start, cpu = peak_rss_mib(), time.perf_counter(), time.process_time()
    build_cluster_cache(cluster_map, records(rows), rows, "synthetic rows", cache)
    offsets = open_cluster_cache(cache, rows)[0]
    return {
        "phase": "first",
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),  # all threads: wall time on a busy machine misleads
        "rss_before_mib": round(start_rss),
        "peak_rss_mib": round(peak_rss_mib()),
        "clusters": len(offsets) - 1,
    }


def cached(rows: int, cache: Path) -> dict:
    start_rss, start = peak_rss_mib(), time.perf_counter()
    offsets, members = open_cluster_cache(cache, rows)
    sampler = ClusterSampler(offsets=offsets, members=members, seed=0)
    load = time.perf_counter() - start
    load_rss = peak_rss_mib()
    start = time.perf_counter()
    drawn = sampler.epoch_indices(0)
    draw = time.perf_counter() - start
    return {
        "phase": "cached",
        "load_seconds": round(load, 3),
        "rss_after_load_mib": round(load_rss),
        "rss_before_mib": round(start_rss),
        "epoch_draw_seconds": round(draw, 2),
        "peak_rss_mib": round(peak_rss_mib()),
        "clusters": len(sampler),
        "drawn": len(drawn),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cluster_map", type=Path)
    parser.add_argument("--rows", type=int, required=True, help="training rows (the map's members)")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: a new temporary one)")
    parser.add_argument("--phase", choices=["first", "cached"], default=None, help="run one phase in this process")
    args = parser.parse_args()
    if args.phase == "first":
        print(json.dumps(first(args.cluster_map, args.rows, args.cache)))
    elif args.phase == "cached":
        print(json.dumps(cached(args.rows, args.cache)))
    else:
        cache = args.cache or Path(tempfile.mkdtemp(prefix="cluster-cache-")) / "map.clusters"
        for phase in ("first", "cached"):
            command = [sys.executable, __file__, str(args.cluster_map), "--rows", str(args.rows)]
            subprocess.run([*command, "--cache", str(cache), "--phase", phase], check=True)


if __name__ == "__main__":
    main()
