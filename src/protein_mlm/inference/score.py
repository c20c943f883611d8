"""`protein-mlm-score`: zero-shot scores of a deep mutational scan, with fair-esm predict.py's arguments.

The output CSV holds the input's columns and one score column per model, named by its `--model-location` as
written (predict.py's naming); it is written only when every row scored, so a refused run leaves no file.
"""

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from protein_mlm.errors import ConfigError, DataError
from protein_mlm.inference.loading import device_for, load_model, resolve_model
from protein_mlm.inference.progress import progress_bar
from protein_mlm.inference.zero_shot import STRATEGIES, WINDOWS, Mutation, check_sequence, parse_mutant, score_mutants


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protein-mlm-score",
        description="Label a deep mutational scan with zero-shot predictions (fair-esm predict.py's arguments; "
        "multi-mutants A42G:C50D and long proteins as ProteinGym)",
    )
    parser.add_argument(
        "--model-location",
        nargs="+",
        required=True,
        help="run dirs, .ckpt files, HF exports, local HF ESM dirs or fair-esm .pt files",
    )
    parser.add_argument("--sequence", help="base sequence to which mutations were applied (not with --dms-mapping)")
    parser.add_argument(
        "--dms-input", type=Path, required=True, help="CSV file of the scan (with --dms-mapping: the folder of CSVs)"
    )
    parser.add_argument("--mutation-col", default="mutant", help="column labeling the mutation as 'AiB' (or AiB:CjD)")
    parser.add_argument(
        "--dms-output", type=Path, required=True, help="output CSV (with --dms-mapping: a folder, one CSV per assay)"
    )
    parser.add_argument("--offset-idx", type=int, default=0, help="number of the first residue in the mutant names")
    parser.add_argument(
        "--scoring-strategy",
        default="wt-marginals",
        choices=STRATEGIES,
        help="wt-marginals: one pass over the wild type; masked-marginals: one pass per mutated site, masked; "
        "pseudo-ppl: one pass per residue of every mutant (slow)",
    )
    parser.add_argument(
        "--dms-mapping",
        type=Path,
        help="ProteinGym's reference file (DMS_substitutions.csv: DMS_id, DMS_filename, target_seq): score every "
        "assay in it, resumably, and write summary.csv",
    )
    parser.add_argument("--dms-ids", nargs="+", help="with --dms-mapping: only these DMS_id (default: all)")
    parser.add_argument(
        "--score-col", default="DMS_score", help="measured scores: when present, Spearman rho and n are printed"
    )
    parser.add_argument(
        "--scoring-window",
        default="optimal",
        choices=WINDOWS,
        help="proteins past --model-window: each site in its own window (optimal) or, for wt-marginals, "
        "ProteinGym's weighted overlapping windows",
    )
    parser.add_argument("--model-window", type=int, default=1024, help="tokens per model pass, <cls>/<eos> included")
    parser.add_argument("--toks_per_batch", type=int, default=4096, help="tokens per batch of masked copies")
    parser.add_argument("--nogpu", action="store_true", help="do not use a GPU even if available")
    return parser


def read_scan(path: Path, column: str) -> pd.DataFrame:
    """The DMS CSV; a missing file or column is a one-line error."""
    if not path.is_file():
        raise DataError(f"--dms-input {path} does not exist; pass the CSV of the mutational scan")
    try:
        df = pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as CSV ({' '.join(str(e).split())[:200]})") from None
    if column not in df.columns:
        raise DataError(
            f"{path} has no column {column!r} (its columns: {', '.join(map(str, df.columns))}); "
            "name the mutant column with --mutation-col"
        )
    if df.empty:
        raise DataError(f"{path} holds no rows; pass a scan with at least one mutant")
    return df


def parse_scan(df: pd.DataFrame, column: str, sequence: str, offset: int, path: Path) -> list[list[Mutation]]:
    """Every row's mutations; an error names the row as it is numbered in the file (line = row + 1)."""
    return [
        parse_mutant(text, sequence, offset, f"{path} row {row + 1} (line {row + 2})")
        for row, text in enumerate(df[column].tolist())
    ]


def spearman(measured: np.ndarray, predicted: np.ndarray) -> tuple[float, int]:
    """Spearman's rho over the rows where both are finite, and their number."""
    from scipy.stats import spearmanr

    keep = np.isfinite(measured) & np.isfinite(predicted)
    if keep.sum() < 2:
        return math.nan, int(keep.sum())
    return float(spearmanr(measured[keep], predicted[keep]).statistic), int(keep.sum())


def write_atomically(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def check_arguments(args: argparse.Namespace) -> None:
    """The settings every scan shares; a bad one is refused before any model is loaded."""
    if args.scoring_window == "overlapping" and args.scoring_strategy != "wt-marginals":
        raise ConfigError("--scoring-window overlapping is for wt-marginals only (as in ProteinGym); use optimal")
    if args.model_window < 3:
        raise ConfigError("--model-window must hold <cls>, a residue and <eos>: 3 tokens at least")


def ready_model(location: str, args: argparse.Namespace) -> torch.nn.Module:
    """The model at `location`, on its device, checked against --model-window."""
    loaded = load_model(location)
    if loaded.max_tokens and args.model_window > loaded.max_tokens:
        raise ConfigError(
            f"--model-window {args.model_window}: {loaded.description} has learned positions for "
            f"{loaded.max_tokens} tokens; pass --model-window {loaded.max_tokens} or less"
        )
    return loaded.model.to(device_for(args.nogpu))


def score_with_bar(model: torch.nn.Module, sequence: str, mutants: list, args: argparse.Namespace) -> np.ndarray:
    """score_mutants with the CLI's settings; pseudo-ppl (minutes to hours) draws a bar of masked copies."""
    with progress_bar() as bar:
        task = bar.add_task("pseudo-ppl", total=len(sequence) * len(mutants))
        progress = (lambda n: bar.advance(task, n)) if args.scoring_strategy == "pseudo-ppl" else None
        return score_mutants(
            model,
            sequence,
            mutants,
            args.scoring_strategy,
            args.model_window,
            args.scoring_window,
            args.toks_per_batch,
            progress,
        )


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Score the scan with every model; write the CSV; print Spearman rho where measured scores exist."""
    check_arguments(args)
    if not args.sequence:
        raise ConfigError(
            "--sequence is missing; pass the wild type (or --dms-mapping with ProteinGym's reference file)"
        )
    sequence = check_sequence(args.sequence)
    df = read_scan(args.dms_input, args.mutation_col)
    mutants = parse_scan(df, args.mutation_col, sequence, args.offset_idx, args.dms_input)
    for location in args.model_location:  # every path checked before the long part; loaded one at a time
        resolve_model(location)
    for location in args.model_location:
        model = ready_model(location, args)
        print(f"Scoring {len(df)} mutants with {location} ({args.scoring_strategy})", flush=True)
        df[location] = score_with_bar(model, sequence, mutants, args)
        del model
    write_atomically(df, args.dms_output)
    print(f"Wrote {args.dms_output}", flush=True)
    if args.score_col in df.columns:
        measured = pd.to_numeric(df[args.score_col], errors="coerce").to_numpy(dtype=float)
        for location in args.model_location:
            rho, n = spearman(measured, df[location].to_numpy(dtype=float))
            print(f"{location}: Spearman rho {rho:.4f} with {args.score_col} (n={n})", flush=True)
    return df
