"""Zero-shot variant-effect scores as a validation metric: `val/zero_shot/<name>_spearman` at every validation.

Enabled with the `callbacks.zero_shot` entry (configs/callbacks/default.yaml). Nothing runs on the training
step: the scans are scored after each validation pass, split across DDP ranks (by site for masked-marginals, by
mutant otherwise), and the plan table shows one rank's cost.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from protein_mlm.errors import ConfigError
from protein_mlm.inference.proteingym import Assay, read_reference
from protein_mlm.inference.score import parse_scan, read_scan, spearman
from protein_mlm.inference.zero_shot import (
    STRATEGIES,
    Mutation,
    check_sequence,
    merge_parts,
    part_shape,
    rank_part,
    sites_of,
)

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass
class Scan:
    """One deep mutational scan, parsed once when the callback is built (errors surface before training)."""

    name: str
    sequence: str
    mutants: list[list[Mutation]]
    measured: np.ndarray


def load_scan(spec: dict[str, Any]) -> Scan:
    """A scan from its config entry: name, csv, sequence, and optionally mutation_col, offset_idx, score_col."""
    missing = [k for k in ("name", "csv", "sequence") if not spec.get(k)]
    if missing:
        raise ConfigError(f"callbacks.zero_shot.scans: an entry lacks {', '.join(missing)}; give name, csv, sequence")
    name = str(spec["name"])
    if not set(name) <= NAME_CHARS:
        raise ConfigError(f"callbacks.zero_shot.scans: name {name!r} goes into a metric name; use letters, digits, _-.")
    path = Path(spec["csv"])
    mutation_col, score_col = spec.get("mutation_col", "mutant"), spec.get("score_col", "DMS_score")
    df = read_scan(path, mutation_col)
    if score_col not in df.columns:
        raise ConfigError(f"{path} has no column {score_col!r} with measured scores; set score_col in its scan entry")
    sequence = check_sequence(str(spec["sequence"]))
    mutants = parse_scan(df, mutation_col, sequence, int(spec.get("offset_idx", 0)), path)
    measured = pd.to_numeric(df[score_col], errors="coerce").to_numpy(dtype=float)
    return Scan(name, sequence, mutants, measured)


def assay_scan(assay: Assay) -> Scan:
    """A ProteinGym assay as a scan named by its DMS_id, its measurements in DMS_score."""
    return load_scan(
        {
            "name": assay.dms_id,
            "csv": str(assay.csv),
            "sequence": assay.sequence,
            "offset_idx": assay.offset,
            "mutation_col": assay.mutation_col,
        }
    )


def passes_per_validation(scans: list[Scan], strategy: str, world: int = 1) -> int:
    """Sequences one rank reads per validation (one per masked copy; rank 0's share, the largest): the cost the
    plan table shows. wt-marginals reads the wild type on every rank; the others split as `rank_part` does."""
    if strategy == "wt-marginals":
        return len(scans)
    if strategy == "masked-marginals":
        return sum(len(sites_of(scan.mutants)[::world]) for scan in scans)
    return sum(len(scan.sequence) * len(scan.mutants[::world]) for scan in scans)


class ZeroShotScores(pl.Callback):
    """Score DMS scans zero-shot after each validation; log Spearman's rho as `val/zero_shot/<name>_spearman`."""

    def __init__(
        self,
        scans: list[dict[str, Any]] | None = None,
        strategy: str = "masked-marginals",
        model_window: int = 1024,
        toks_per_batch: int = 4096,
        reference: str | None = None,
        dms_folder: str | None = None,
        dms_ids: list[str] | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ConfigError(f"callbacks.zero_shot.strategy={strategy} is not one of {', '.join(STRATEGIES)}")
        if not scans and not reference:
            raise ConfigError(
                "callbacks.zero_shot has no scans; list {name, csv, sequence} entries or give reference "
                "(ProteinGym's DMS_substitutions.csv) and dms_folder"
            )
        if reference and not dms_folder:
            raise ConfigError("callbacks.zero_shot.reference needs dms_folder, the folder of the assays' CSVs")
        self.scans = [load_scan(dict(spec)) for spec in scans or []]
        if reference:  # a ProteinGym panel: the assays named in dms_ids (all when omitted)
            assays = read_reference(Path(reference), Path(dms_folder), list(dms_ids) if dms_ids else None)
            self.scans += [assay_scan(assay) for assay in assays]
        names = [scan.name for scan in self.scans]
        if len(set(names)) < len(names):
            raise ConfigError(f"callbacks.zero_shot.scans: names must differ ({', '.join(names)})")
        self.strategy, self.model_window, self.toks_per_batch = strategy, model_window, toks_per_batch
        self.latest: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy).__name__.startswith("FSDP"):
            # Each rank scores other mutants, so the ranks' forward passes differ in number: FSDP's per-layer
            # all-gathers would wait on one another.
            raise ConfigError("callbacks.zero_shot cannot run under FSDP (strategy=fsdp); use DDP or drop it")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {}
        for scan in self.scans:
            predicted = self._score_split(trainer, pl_module, scan)
            rho, _ = spearman(scan.measured, predicted)
            metrics[f"val/zero_shot/{scan.name}_spearman"] = rho
        self.latest = metrics
        for key, value in metrics.items():  # callback_metrics, e.g. for a checkpoint monitor
            pl_module.log(key, value if math.isfinite(value) else float("nan"), logger=False)
        step = max(trainer.global_step - 1, 0)  # the step val/loss is logged at (module.on_validation_epoch_end)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _score_split(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scan: Scan) -> np.ndarray:
        """This rank scores its share (sites for masked-marginals, mutants otherwise); an all-gather gives every
        rank every part, merged into the whole scan's scores."""
        rank, world = trainer.global_rank, trainer.world_size
        model = pl_module.model
        was_training = model.training
        model.eval()
        part = rank_part(
            model, scan.sequence, scan.mutants, self.strategy, rank, world, self.model_window, "optimal",
            self.toks_per_batch,
        )  # fmt: skip
        model.train(was_training)
        if world == 1:
            return merge_parts(scan.mutants, self.strategy, [part])
        shapes = [part_shape(scan.mutants, self.strategy, r, world) for r in range(world)]
        padded = torch.zeros(shapes[0], dtype=torch.float64, device=pl_module.device)  # rank 0's share is largest
        padded[: len(part)] = torch.as_tensor(part, dtype=torch.float64)
        gathered = trainer.strategy.all_gather(padded).cpu().numpy()  # (world, *shapes[0])
        return merge_parts(scan.mutants, self.strategy, [gathered[r][: shapes[r][0]] for r in range(world)])
