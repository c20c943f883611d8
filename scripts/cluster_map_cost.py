"""What a cluster map costs: its first read into CSR arrays, and every later (cached, memory-mapped) load.

    python scripts/make_cluster_map.py /tmp/map.tsv --clusters 2000000 --members 6000000
    python scripts/cluster_map_cost.py /tmp/map.tsv --rows 6000000

Each phase runs in a fresh process, so its peak RSS is its own, and prints one JSON line:
- `first`: read the map (pyarrow CSV), join it to the rows' record ids, build the CSR arrays, write the cache;
- `cached`: memory-map the cache (what every rank of every later run does), then draw one epoch's members.
The rows' record ids are given (row r is `UniRef90_<p(r)>` for a random permutation p of the members), as
`clusters.row_record_ids` returns them; hashing the training rows to find them is a cost of preprocessing and is
not measured here.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protein_mlm.data.clusters import ClusterSampler, cluster_arrays, open_cluster_cache, write_cluster_cache


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def records(rows: int) -> pa.Table:
    """(id, row) for every row, the ids a random permutation of the map's members."""
    member = np.random.default_rng(0).permutation(rows)
    ids = pc.binary_join_element_wise("UniRef90_", pc.cast(pa.array(member), pa.string()), "")
    return pa.table({"id": ids, "row": np.arange(rows, dtype=np.int64)})


def first(cluster_map: Path, rows: int, cache: Path) -> dict:
    table = records(rows)
    start_rss, start, cpu = peak_rss_mib(), time.perf_counter(), time.process_time()
    offsets, members = cluster_arrays(cluster_map, table, rows, source="synthetic rows")
    write_cluster_cache(cache, offsets, members, rows)
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
