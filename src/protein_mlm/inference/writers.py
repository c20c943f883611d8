"""Where protein-mlm-embed writes: extract.py's `.pt` files, or memory-mapped `.npy` arrays for large sets."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protein_mlm.errors import ConfigError


@dataclass
class Record:
    index: int  # position in the FASTA
    record_id: str
    label: str  # the whole header line, as extract.py's label
    length: int  # residues after truncation
    cut: bool  # longer than the truncation length


class PtWriter:
    """extract.py's layout: `<id>.pt` holding label, representations, mean/bos_representations, contacts."""

    def __init__(self, out: Path, records: list[Record], include: list[str], fp16: bool):
        self.out, self.records, self.include, self.fp16 = out, records, include, fp16

    def path(self, record: Record) -> Path:
        return self.out / f"{record.record_id}.pt"

    def done(self, record: Record) -> bool:
        return self.path(record).is_file()

    def write(self, record: Record, reps: dict[int, torch.Tensor], contacts: torch.Tensor | None) -> None:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return (t.half() if self.fp16 else t).clone()  # clone: not a view into the batch's storage

        n = record.length
        result: dict = {"label": record.label}
        if "per_tok" in self.include:
            result["representations"] = {layer: cast(t[1 : n + 1]) for layer, t in reps.items()}
        if "mean" in self.include:
            result["mean_representations"] = {layer: cast(t[1 : n + 1].mean(0)) for layer, t in reps.items()}
        if "bos" in self.include:
            result["bos_representations"] = {layer: cast(t[0]) for layer, t in reps.items()}
        if contacts is not None:
            result["contacts"] = contacts[:n, :n].clone()
        path = self.path(record)
        path.parent.mkdir(parents=True, exist_ok=True)  # an id with '/' makes a subdirectory, as in extract.py
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)  # a killed run never leaves a partial file that a rerun would skip

    def flush(self) -> None:
        pass


class NpyWriter:
    """One memory-mapped .npy per kind and layer; rows in FASTA order; `done.npy` marks the records written."""

    def __init__(self, out: Path, records: list[Record], include: list[str], layers: list[int], fp16: bool, dim: int):
        self.out, self.include, self.layers = out, include, layers
        dtype = np.float16 if fp16 else np.float32
        lengths = np.array([r.length for r in records], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.pair_offsets = np.concatenate([[0], np.cumsum(lengths**2)])
        new = not (out / "done.npy").is_file()
        if new:
            np.save(out / "per_tok_offsets.npy", self.offsets)
            if "contacts" in include:
                np.save(out / "contacts_offsets.npy", self.pair_offsets)
            with open(out / "records.tsv", "w") as f:  # the labels index: row i of every array is line i + 2
                f.write("id\tlength\tlabel\n")
                f.writelines(f"{r.record_id}\t{r.length}\t{r.label.replace(chr(9), ' ')}\n" for r in records)
        shapes = {"mean": (len(records), dim), "bos": (len(records), dim), "per_tok": (int(self.offsets[-1]), dim)}
        self.arrays: dict[str, np.memmap] = {}
        for kind in ("mean", "bos", "per_tok"):
            if kind in include:
                for layer in layers:
                    self.arrays[f"{kind}_layer{layer}"] = self._open(f"{kind}_layer{layer}", shapes[kind], dtype, new)
        if "contacts" in include:
            self.arrays["contacts"] = self._open("contacts", (int(self.pair_offsets[-1]),), np.float32, new)
        self.done_flags = self._open("done", (len(records),), np.bool_, new)

    def _open(self, name: str, shape: tuple, dtype, new: bool) -> np.memmap:
        path = self.out / f"{name}.npy"
        if new:
            return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        return np.load(path, mmap_mode="r+")

    def done(self, record: Record) -> bool:
        return bool(self.done_flags[record.index])

    def write(self, record: Record, reps: dict[int, torch.Tensor], contacts: torch.Tensor | None) -> None:
        i, n = record.index, record.length
        for layer, t in reps.items():
            if "per_tok" in self.include:
                self.arrays[f"per_tok_layer{layer}"][self.offsets[i] : self.offsets[i + 1]] = t[1 : n + 1].numpy()
            if "mean" in self.include:
                self.arrays[f"mean_layer{layer}"][i] = t[1 : n + 1].mean(0).numpy()
            if "bos" in self.include:
                self.arrays[f"bos_layer{layer}"][i] = t[0].numpy()
        if contacts is not None:
            self.arrays["contacts"][self.pair_offsets[i] : self.pair_offsets[i + 1]] = contacts[:n, :n].reshape(-1)
        self.done_flags[i] = True

    def flush(self) -> None:
        """Data first, then the done flags: a killed run never marks a record whose rows are not on disk."""
        for array in self.arrays.values():
            array.flush()
        self.done_flags.flush()


def check_same_settings(path: Path, settings: dict, holds: str, fix: str) -> None:
    """A rerun into the same output must ask for what `path` recorded, or skipping done work would mix two settings."""
    if path.is_file():
        before = json.loads(path.read_text())
        differing = [k for k in settings if before.get(k) != settings[k]]
        if differing:
            raise ConfigError(f"{path.parent} holds {holds} with other settings ({', '.join(differing)}); {fix}")


def check_manifest(out: Path, manifest: dict) -> None:
    """An embedding rerun into the same directory must ask for the same extraction."""
    check_same_settings(
        out / "manifest.json", manifest, "an extraction", "pass a new output directory or the same arguments"
    )
