"""What planning an epoch costs one rank at UniRef scale: time, peak memory, commit cost, plans per boundary.

    .venv/bin/python scripts/plan_cost.py --sequences 60000000 --ranks 8            # token-budget batches
    .venv/bin/python scripts/plan_cost.py --sequences 60000000 --ranks 8 --packing  # packed rows

Synthetic UniRef50-like lengths (log-normal around 300 residues, cut to data.max_length), one core. Prints one JSON
line: `plan_seconds` (rank 0's plan of epoch 0, built synchronously; `plan_cpu_seconds` the CPU time it took, which
other load on the core does not inflate), `peak_rss_mib` (the whole process),
`commit_us` (mean `ResumableLoader.commit` + `state_dict` per update), `plans_per_boundary` (the most plans any
epoch got while the loader read into epoch 1 with epoch 0's last batches not yet committed).
"""

import argparse
import json
import os
import resource
import time

import numpy as np
from torch.utils.data import Dataset

from protein_mlm.data.loader import ResumableLoader
from protein_mlm.data.packing import PackedBatches
from protein_mlm.data.samplers import TokenBudgetBatchSampler

MEDIAN_RESIDUES, SIGMA = 300, 0.75  # UniRef50-like: median ~300 residues, a long right tail


def synthetic_lengths(count: int, max_length: int, seed: int) -> np.ndarray:
    """Token lengths (<cls> and <eos> included) as uint16, drawn in chunks so the floats never exist all at once."""
    lengths = np.empty(count, dtype=np.uint16)
    rng = np.random.default_rng(seed)
    for start in range(0, count, 1 << 22):
        size = min(1 << 22, count - start)
        residues = rng.lognormal(np.log(MEDIAN_RESIDUES), SIGMA, size=size)
        lengths[start : start + size] = np.clip(residues, 1, max_length - 2).astype(np.uint16) + 2
    return lengths


class Keys(Dataset):
    """Stands in for the sequences: the loader only needs something to index."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, key):
        return key


def commit_cost(loader: ResumableLoader, batches: int) -> float:
    """Microseconds per update: a commit and a checkpoint's state, over a whole epoch of updates."""
    start = time.perf_counter()
    for index in range(batches):
        loader.commit((0, index))
        loader.state_dict()
    return (time.perf_counter() - start) / batches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, required=True, help="sequences one epoch plans")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--packing", action="store_true", help="packed rows instead of token-budget batches")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as one rank's data process would get
    lengths = synthetic_lengths(args.sequences, args.max_length, args.seed)
    planner = dict(num_replicas=args.ranks, rank=0)
    if args.packing:
        rows = args.max_tokens // args.max_length
        batcher = PackedBatches(lengths, rows, args.max_length, args.seed, **planner)
    else:
        batcher = TokenBudgetBatchSampler(lengths, args.max_tokens, args.seed, **planner)
    del lengths  # the batcher keeps its own copy
    start, cpu_start = time.perf_counter(), time.process_time()
    plan = batcher.rank_batches(0)
    plan_seconds, plan_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # The boundary as training meets it: the stream reads epoch 0's last batches and on into epoch 1 (planned in
    # the background since epoch 0 began) while commits and checkpoints for epoch 0 still arrive.
    loader = ResumableLoader(Keys(), batcher, collate_fn=lambda keys: keys, num_workers=0, pin_memory=False)
    stream = loader._stream
    stream.start = (0, max(len(plan) - 3, 0))
    reads = iter(stream)
    for _ in range(4):
        next(reads)
    commit_us = commit_cost(loader, len(plan))
    loader.commit((1, 0))
    loader.state_dict()
    record = {
        "plan_seconds": round(plan_seconds, 2),
        "plan_cpu_seconds": round(plan_cpu_seconds, 2),  # on a shared machine: the plan's own work
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "commit_us": round(commit_us, 2),
        "plans_per_boundary": max(batcher.plans_built.values()),
        "epochs_planned": sorted(batcher.plans_built),
        "sequences": args.sequences,
        "ranks": args.ranks,
        "strategy": batcher.order_version,
        "batches_per_rank": len(plan),
        "samples_per_rank": len(plan.indices),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
