"""Peak memory of a zero-shot scan against its number of mutants: flat when scores are reduced per batch.

    .venv/bin/python scripts/zero_shot_memory.py --mutants 100 400 1600 --length 300

Each (strategy, mutants) pair runs in a fresh process (peak RSS is a process-lifetime maximum): a tiny ESM-2 with
no transformer layer (width 16: embeddings and LM head, so that pseudo-ppl's 480,000 masked copies take minutes; the
scan's bookkeeping, which is what grew, is measured) scores that many single mutants of a random protein of
`--length` residues on one CPU thread, at the CLI's --toks_per_batch 4096 and --model-window 1024.
Prints a Markdown table: peak RSS in MiB and seconds per run.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from protein_mlm.inference.zero_shot import STRATEGIES, Mutation, score_mutants
from protein_mlm.model.esm import build_model

AMINO = "ACDEFGHIKLMNPQRSTVWY"
TINY = {
    "num_hidden_layers": 0,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "position_embedding_type": "rotary",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def one_run(strategy: str, mutants: int, length: int, window: int) -> dict:
    """Score `mutants` distinct single mutants; return peak RSS (MiB) and seconds."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sequence = "".join(rng.choice(list(AMINO), size=length))
    singles = [(i, a) for i in range(length) for a in AMINO if a != sequence[i]]
    chosen = rng.choice(len(singles), size=mutants, replace=False)
    scan = [[Mutation(singles[k][0], sequence[singles[k][0]], singles[k][1])] for k in chosen]
    with warnings.catch_warnings():  # a contact head over 0 layers has 0 inputs: torch warns, harmlessly
        warnings.simplefilter("ignore", UserWarning)
        model = build_model(TINY).eval()
    start = time.perf_counter()
    scores = score_mutants(model, sequence, scan, strategy, window=window)
    assert len(scores) == mutants and np.isfinite(scores).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "strategy": strategy,
        "mutants": mutants,
        "peak_rss_mib": round(peak),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--length", type=int, default=300, help="residues of the wild type")
    parser.add_argument("--window", type=int, default=1024, help="--model-window (tokens per pass)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # strategy, mutants: one measured run
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child[0], int(args.child[1]), args.length, args.window)))
        return
    print(f"| strategy | {' | '.join(f'{n} mutants' for n in args.mutants)} |")
    print(f"| --- |{' --- |' * len(args.mutants)}")
    for strategy in args.strategies:
        cells = []
        for n in args.mutants:
            argv = [sys.executable, __file__, "--child", strategy, str(n), "--length", str(args.length)]
            out = subprocess.run([*argv, "--window", str(args.window)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.splitlines()[-1])
            cells.append(f"{result['peak_rss_mib']} MiB ({result['seconds']} s)")
        print(f"| {strategy} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
