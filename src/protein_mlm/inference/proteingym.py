"""Every assay of ProteinGym's substitution benchmark in one command: `protein-mlm-score --dms-mapping`.

The reference file (DMS_substitutions.csv) names one assay per row: `DMS_id`, `DMS_filename` (in the --dms-input
folder) and `target_seq`; `start_idx` (the number of target_seq's first residue; default 1, as ProteinGym) and
`DMS_mutant_column` (default --mutation-col) when present. Each assay is written as <DMS_id>.csv (its columns plus
one score column per model, as a single-assay run writes) and summary.csv holds DMS_id, model, Spearman and n per
assay, with the mean over the assays. A rerun skips every (assay, model) whose column is already written.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from protein_mlm.errors import ConfigError, DataError
from protein_mlm.inference import score
from protein_mlm.inference.loading import resolve_model
from protein_mlm.inference.writers import check_same_settings
from protein_mlm.inference.zero_shot import check_sequence

COLUMNS = ("DMS_id", "DMS_filename", "target_seq")


@dataclass(frozen=True)
class Assay:
    """One row of the reference file, resolved against the folder of assay CSVs."""

    dms_id: str
    csv: Path
    sequence: str
    offset: int
    mutation_col: str


def read_reference(reference: Path, folder: Path, ids: list[str] | None, mutation_col: str = "mutant") -> list[Assay]:
    """The assays of ProteinGym's reference file (all, or `ids` in the file's order); a problem is one line."""
    if not reference.is_file():
        raise DataError(f"--dms-mapping {reference} does not exist; pass ProteinGym's DMS_substitutions.csv")
    table = pd.read_csv(reference)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{reference} lacks the column(s) {', '.join(missing)}; pass ProteinGym's reference file")
    unknown = sorted(set(ids or []) - set(table["DMS_id"]))
    if unknown:
        raise ConfigError(f"--dms-ids {' '.join(unknown)} not in {reference}; name DMS_id values of that file")
    if ids:
        table = table[table["DMS_id"].isin(ids)]
    if not folder.is_dir():
        raise DataError(f"--dms-input {folder} is not a folder; with --dms-mapping pass the folder of assay CSVs")
    assays = []
    for row in table.itertuples(index=False):
        start = getattr(row, "start_idx", 1)
        column = getattr(row, "DMS_mutant_column", None)
        assays.append(
            Assay(
                str(row.DMS_id),
                folder / str(row.DMS_filename),
                check_sequence(str(row.target_seq)),
                1 if pd.isna(start) else int(start),
                mutation_col if column is None or pd.isna(column) else str(column),
            )
        )
    return assays


def load_assay(assay: Assay) -> tuple[pd.DataFrame, list]:
    """The assay's rows and parsed mutants (a wrong wild type names the file and line)."""
    df = score.read_scan(assay.csv, assay.mutation_col)
    return df, score.parse_scan(df, assay.mutation_col, assay.sequence, assay.offset, assay.csv)


def run_all(args: argparse.Namespace) -> pd.DataFrame:
    """Score every assay with every model (skipping what a previous run wrote); write the summary; return it."""
    score.check_arguments(args)
    if args.sequence:
        raise ConfigError("--sequence comes from the reference file's target_seq with --dms-mapping; drop --sequence")
    assays = read_reference(args.dms_mapping, args.dms_input, args.dms_ids, args.mutation_col)
    for assay in assays:  # every assay and model checked before the long part
        load_assay(assay)
    for location in args.model_location:
        resolve_model(location)
    out: Path = args.dms_output
    check_settings(out, args)
    for location in args.model_location:
        todo = [a for a in assays if location not in written_columns(out / f"{a.dms_id}.csv")]
        print(f"{location}: {len(assays) - len(todo)} of {len(assays)} assays already scored in {out}", flush=True)
        if not todo:
            continue
        model = score.ready_model(location, args)
        for n, assay in enumerate(todo, 1):
            df, mutants = load_assay(assay)
            print(f"[{n}/{len(todo)}] {assay.dms_id}: {len(df)} mutants ({args.scoring_strategy})", flush=True)
            path = out / f"{assay.dms_id}.csv"
            if path.is_file():  # another model's column is there: keep it
                df = pd.read_csv(path)
            df[location] = score.score_with_bar(model, assay.sequence, mutants, args)
            score.write_atomically(df, path)
        del model
    summary = summarize(out, assays, args.model_location, args.score_col)
    score.write_atomically(summary, out / "summary.csv")
    for location in args.model_location:
        mean = summary[(summary["DMS_id"] == "mean") & (summary["model"] == location)]["Spearman"].iloc[0]
        print(
            f"{location}: mean Spearman rho {mean:.4f} over {len(assays)} assays; wrote {out}/summary.csv", flush=True
        )
    return summary


def written_columns(path: Path) -> list[str]:
    return list(pd.read_csv(path, nrows=0).columns) if path.is_file() else []


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """A rerun into the same folder must score the same way, or its assays would mix two settings."""
    settings = {
        "dms_mapping": str(args.dms_mapping.resolve()),
        "scoring_strategy": args.scoring_strategy,
        "scoring_window": args.scoring_window,
        "model_window": args.model_window,
    }
    path = out / "settings.json"
    check_same_settings(path, settings, "scores", "pass a new --dms-output folder or the same arguments")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def summarize(out: Path, assays: list[Assay], locations: list[str], score_col: str) -> pd.DataFrame:
    """DMS_id, model, Spearman, n per assay and model, then one `mean` row per model (mean rho, total n)."""
    rows = []
    for location in locations:
        per_model = []
        for assay in assays:
            df = pd.read_csv(out / f"{assay.dms_id}.csv")
            if score_col not in df.columns:
                raise DataError(f"{assay.csv} has no column {score_col!r}; name the measured scores with --score-col")
            measured = pd.to_numeric(df[score_col], errors="coerce").to_numpy(dtype=float)
            rho, n = score.spearman(measured, df[location].to_numpy(dtype=float))
            per_model.append({"DMS_id": assay.dms_id, "model": location, "Spearman": rho, "n": n})
        rhos = np.array([r["Spearman"] for r in per_model])
        mean = float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan")
        rows += [
            *per_model,
            {"DMS_id": "mean", "model": location, "Spearman": mean, "n": sum(r["n"] for r in per_model)},
        ]
    return pd.DataFrame(rows, columns=["DMS_id", "model", "Spearman", "n"])


def run(args: argparse.Namespace):
    """`protein-mlm-score`: every assay of a reference file with --dms-mapping, else the one scan."""
    return run_all(args) if args.dms_mapping else score.run(args)
