"""Write a large FASTA by resampling the bundled Swiss-Prot sample, for testing preprocessing at scale.

    python scripts/make_big_fasta.py big.fasta.gz --sequences 1000000

Each record is a random bundled sequence with `--mutation-rate` of its residues replaced by random standard amino
acids, so nearly every record is unique (exact duplicates would be removed and leave nothing to measure).
"""

import argparse
import gzip
from pathlib import Path

import numpy as np

from protein_mlm.alphabet import STANDARD_AMINO_ACIDS
from protein_mlm.data.fasta import read_fasta
from protein_mlm.data.preprocess import BUNDLED_FASTA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output FASTA; gzipped (level 1) when it ends in .gz")
    parser.add_argument("--sequences", type=int, default=1_000_000, help="records to write")
    parser.add_argument("--mutation-rate", type=float, default=0.02, help="share of residues replaced per record")
    parser.add_argument("--seed", type=int, default=0, help="seeds the resampling and the substitutions")
    args = parser.parse_args()

    source = [np.frombuffer(residues, dtype=np.uint8) for _, residues in read_fasta(Path(str(BUNDLED_FASTA)))]
    alphabet = np.frombuffer(STANDARD_AMINO_ACIDS.encode(), dtype=np.uint8)
    rng = np.random.default_rng(args.seed)
    picks = rng.integers(0, len(source), size=args.sequences)
    opener = (lambda p: gzip.open(p, "wb", compresslevel=1)) if args.out.suffix == ".gz" else (lambda p: open(p, "wb"))
    with opener(args.out) as out:
        for start in range(0, args.sequences, 10_000):  # build 10k records at a time, write them in one go
            lines = []
            for n in range(start, min(start + 10_000, args.sequences)):
                seq = source[picks[n]].copy()
                sites = rng.random(len(seq)) < args.mutation_rate
                seq[sites] = rng.choice(alphabet, size=int(sites.sum()))
                text = seq.tobytes()
                lines.append(b">big%d\n" % n)
                lines.extend(text[i : i + 60] + b"\n" for i in range(0, len(text), 60))  # UniProt's 60 per line
            out.write(b"".join(lines))
    print(f"wrote {args.sequences:,} sequences to {args.out}")


if __name__ == "__main__":
    main()
