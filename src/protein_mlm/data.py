"""FASTA -> deduplicated, split, tokenized Arrow datasets (cached on disk) -> masked-LM DataLoaders."""

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytorch_lightning as pl
import torch
from datasets.arrow_writer import ArrowWriter
from torch.utils.data import DataLoader, Dataset

from .clusters import ClusterSampler, build_cluster_sampler, load_row_record_ids
from .errors import ConfigError, DataError
from .fasta import read_fasta
from .masking import IGNORE_INDEX, collate, crop, mask_tokens, sample_rng
from .samplers import EpochSampler, TokenBudgetBatchSampler, padding_index
from .streaming import StreamingFastaDataset, fasta_files
from .tokenizer import VOCAB, encode_residues

_LETTERS = np.frombuffer("".join(t if len(t) == 1 else "?" for t in VOCAB).encode(), dtype=np.uint8)

log = logging.getLogger(__name__)
datasets.disable_progress_bars()  # the one-off Arrow conversion is quick; its bars only clutter the log

BUNDLED_FASTA = resources.files("protein_mlm") / "assets" / "swissprot_sample.fasta.gz"
CACHE_FORMAT = 2  # bump when the stored layout or the split rule changes, so old caches are not reused
FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint8"))})  # 1 byte per residue
CHUNK_RECORDS = 10_000  # records per Arrow write: bounds the memory preprocessing needs, whatever the file size


@dataclass
class SplitStats:
    """What preprocessing did, for the start-up log and the run summary."""

    train_sequences: int
    val_sequences: int
    duplicates_removed: int
    empty_removed: int
    val_overlap_removed: int


def is_val_sequence(residues: bytes, val_fraction: float) -> bool:
    """Deterministic split by content hash: file order does not matter and duplicates cannot straddle it."""
    digest = hashlib.blake2b(residues, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class DigestSet:
    """A set of 16-byte digests held as a few sorted numpy runs: 16 bytes per entry (a Python set needs ~150).

    Each `add` appends a sorted run; equal-sized neighbours are merged (as an LSM tree), so there are O(log n)
    runs to search and the merges cost O(n log n) in all.
    """

    def __init__(self):
        self.runs: list[np.ndarray] = []  # dtype S16, each sorted

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            found |= run[at] == digests
        return found

    def add(self, digests: np.ndarray) -> np.ndarray:
        """Add `digests`; True at the first occurrence of each one that was not in the set yet."""
        _, first = np.unique(digests, return_index=True)
        first = first[~self.contains(digests[first])]
        new = np.zeros(len(digests), dtype=bool)
        new[first] = True
        if len(first):
            self.runs.append(np.sort(digests[first]))
            while len(self.runs) > 1 and len(self.runs[-2]) <= len(self.runs[-1]):
                self.runs[-2:] = [np.sort(np.concatenate(self.runs[-2:]), kind="stable")]  # timsort: linear here
        return new


def _unique_sequences(
    path: Path, seen: DigestSet, counts: dict[str, int], exclude: DigestSet | None = None
) -> Iterator[bytes]:
    """Residue strings of a FASTA in file order, exact duplicates, empty records and those in `exclude` dropped.

    Duplicates are found by 16-byte blake2b digest, a chunk of records at a time, not by keeping the sequences.
    `counts` gains the records read, the empty ones, the duplicates and the excluded ones.
    """
    chunk: list[bytes] = []
    for _, residues in read_fasta(path):
        counts["records"] += 1
        if not residues:
            counts["empty"] += 1
            continue
        chunk.append(residues)
        if len(chunk) >= CHUNK_RECORDS:
            yield from _first_seen(chunk, seen, counts, exclude)
            chunk = []
    yield from _first_seen(chunk, seen, counts, exclude)


def _first_seen(chunk: list[bytes], seen: DigestSet, counts: dict[str, int], exclude: DigestSet | None):
    if not chunk:
        return
    digests = np.array([hashlib.blake2b(r, digest_size=16).digest() for r in chunk], dtype="S16")
    keep = seen.add(digests)
    counts["duplicates"] += len(chunk) - int(keep.sum())
    if exclude is not None:
        excluded = keep & exclude.contains(digests)
        counts["excluded"] = counts.get("excluded", 0) + int(excluded.sum())
        keep &= ~excluded
    yield from (residues for residues, k in zip(chunk, keep) if k)


class _ArrowSplitWriter:
    """Appends residue strings to an Arrow file in chunks: one vectorised lookup per chunk, uint8 ids on disk."""

    def __init__(self, path: Path):
        self.path, self.chunk_records = path, CHUNK_RECORDS
        self.writer = ArrowWriter(features=FEATURES, path=str(path))
        self.pending: list[bytes] = []
        self.count = 0

    def add(self, residues: bytes) -> None:
        self.pending.append(residues)
        if len(self.pending) >= self.chunk_records:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        offsets = np.zeros(len(self.pending) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self.pending], out=offsets[1:])
        ids = pa.LargeListArray.from_arrays(offsets, encode_residues(b"".join(self.pending)))
        self.writer.write_table(pa.table({"input_ids": ids.cast(FEATURES.arrow_schema.field("input_ids").type)}))
        self.count += len(self.pending)
        self.pending = []

    def close(self) -> datasets.Dataset:
        self._flush()
        self.writer.finalize()
        self.writer.close()
        return datasets.Dataset.from_file(str(self.path))  # memory-mapped


def _cache_key(*paths: Path | None, **settings) -> str:
    """Identify a preprocessing result by the input files' identity (path, size, mtime) and the settings."""
    parts = [str(CACHE_FORMAT), json.dumps(settings, sort_keys=True)]
    for p in paths:
        if p is not None:
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_splits(
    train_path: Path, val_path: Path | None, val_fraction: float, out_dir: Path | None = None
) -> tuple[dict, SplitStats]:
    """Read, deduplicate and split; with a separate val file, drop its sequences from train (no leakage).

    One streaming pass per file writes `train.arrow` / `val.arrow` into `out_dir` (a new temporary dir by
    default) in file order; memory grows only by the 16-byte digest of each unique sequence.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="protein_mlm-splits-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {name: _ArrowSplitWriter(out_dir / f"{name}.arrow") for name in ("train", "val")}
    counts = {"records": 0, "empty": 0, "duplicates": 0, "excluded": 0}
    if val_path is None:
        for residues in _unique_sequences(train_path, DigestSet(), counts):
            writers["val" if is_val_sequence(residues, val_fraction) else "train"].add(residues)
    else:
        val_digests = DigestSet()
        for residues in _unique_sequences(val_path, val_digests, {"records": 0, "empty": 0, "duplicates": 0}):
            writers["val"].add(residues)
        for residues in _unique_sequences(train_path, DigestSet(), counts, exclude=val_digests):
            writers["train"].add(residues)
    splits = {name: writer.close() for name, writer in writers.items()}
    if not len(splits["train"]) or not len(splits["val"]):
        which = "training" if not len(splits["train"]) else "validation"
        raise DataError(
            f"the {which} split of {train_path} is empty; give more sequences, "
            "change data.val_fraction or pass data.val_path"
        )
    stats = SplitStats(
        len(splits["train"]), len(splits["val"]), counts["duplicates"], counts["empty"], counts["excluded"]
    )
    return splits, stats


def load_splits(
    train_path: Path, val_path: Path | None, val_fraction: float, cache_dir: Path
) -> tuple[dict[str, datasets.Dataset], SplitStats]:
    """Memory-mapped Arrow splits, built once per input and reused from `cache_dir` afterwards."""
    key = _cache_key(train_path, val_path, val_fraction=None if val_path else val_fraction)
    target = cache_dir / key
    if not (target / "stats.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so concurrent runs never read a half-written cache.
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-"))
        try:
            _, stats = build_splits(train_path, val_path, val_fraction, out_dir=tmp)
            (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("Tokenized %s into %s", train_path, target)
    stats = SplitStats(**json.loads((target / "stats.json").read_text()))
    splits = {name: datasets.Dataset.from_file(str(target / f"{name}.arrow")) for name in ("train", "val")}
    return splits, stats


def load_sequences(path: Path, cache_dir: Path) -> datasets.Dataset:
    """One FASTA's unique sequences in file order (e.g. the validation file of a streaming run), cached."""
    target = cache_dir / f"{_cache_key(path, unique_sequences=True)}.arrow"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}-")
        os.close(fd)
        writer = _ArrowSplitWriter(Path(tmp))
        for residues in _unique_sequences(path, DigestSet(), {"records": 0, "empty": 0, "duplicates": 0}):
            writer.add(residues)
        if not len(writer.close()):
            os.unlink(tmp)
            raise DataError(f"{path} holds no non-empty sequence; pass a FASTA file with sequences")
        os.replace(tmp, target)  # atomic: a concurrent run reads no half-written file
    return datasets.Dataset.from_file(str(target))


def check_streaming_options(val_path, max_tokens, cluster_map, tokens_per_update) -> None:
    """data.streaming=true reads the training FASTA once, lazily: refuse the options that need it all up front."""
    if val_path is None:
        raise ConfigError(
            "data.streaming=true needs data.val_path (a held-out split would need a pass over all the data first)"
        )
    if max_tokens is not None or tokens_per_update is not None:
        raise ConfigError(
            "data.streaming=true cannot honour data.max_tokens / data.tokens_per_update (token-budget batches need "
            "every length up front); set data.max_tokens=null data.tokens_per_update=null and use data.batch_size"
        )
    if cluster_map is not None:
        raise ConfigError("data.streaming=true cannot sample by cluster (data.cluster_map); set data.cluster_map=null")


def decode_ids(ids: np.ndarray) -> bytes:
    """The residue letters of token ids (the inverse of encode_residues), e.g. to hash a stored sequence."""
    return _LETTERS[ids].tobytes()


def residue_lengths(sequences: datasets.Dataset) -> np.ndarray:
    """Length of every sequence, read from the Arrow offsets without materialising the rows."""
    return pc.list_value_length(sequences.data.column("input_ids")).to_numpy()


def unigram_perplexity(sequences: datasets.Dataset) -> float:
    """Perplexity of the split's own amino-acid frequencies: what a context-free predictor can reach."""
    ids = pc.list_flatten(sequences.data.column("input_ids")).to_numpy()
    probs = np.bincount(ids, minlength=len(VOCAB)) / len(ids)
    probs = probs[probs > 0]
    return math.exp(-(probs * np.log(probs)).sum())


class MaskedSequenceDataset(Dataset):
    """Index with (epoch, sample index): crop and mask are drawn from a generator keyed on both and the seed."""

    def __init__(self, sequences: datasets.Dataset, max_length: int, seed: int, mask_prob: float = 0.15):
        self.sequences = sequences.with_format("numpy")
        self.max_residues = max_length - 2  # room for <cls> and <eos>
        self.seed = seed
        self.mask_prob = mask_prob

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        epoch, index = key
        if index < 0:  # a validation rank's padding (samplers.padding_index): same tokens, no targets
            input_ids, labels = self[epoch, padding_index(index)]
            return input_ids, np.full_like(labels, IGNORE_INDEX)
        rng = sample_rng(self.seed, epoch, index)
        residues = crop(self.sequences[index]["input_ids"], self.max_residues, rng)
        return mask_tokens(residues, rng, mask_prob=self.mask_prob)


class ProteinDataModule(pl.LightningDataModule):
    """Bundled Swiss-Prot (or any FASTA) as masked-LM batches; validation masks are fixed across evaluations."""

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.03,
        max_length: int = 1024,
        batch_size: int = 16,
        max_tokens: int | None = None,
        tokens_per_update: int | None = None,
        num_workers: int = 0,
        mask_prob: float = 0.15,
        seed: int = 0,
        cache_dir: str = ".cache/data",
        pin_memory: bool | None = None,
        cluster_map: str | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
    ):
        super().__init__()
        if streaming:
            check_streaming_options(val_path, max_tokens, cluster_map, tokens_per_update)
        if max_length < 3:
            raise ConfigError(f"data.max_length={max_length} leaves no room for residues; use at least 3")
        if max_tokens is not None and max_tokens < max_length:
            raise ConfigError(
                f"data.max_tokens={max_tokens} is below data.max_length={max_length}, so a long sequence fits no "
                "batch; raise data.max_tokens or lower data.max_length"
            )
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be at least 1")
        if not 0.0 < val_fraction < 1.0 and val_path is None:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1), or pass data.val_path")
        self.train_path = Path(train_path) if train_path else Path(str(BUNDLED_FASTA))
        self.val_path = Path(val_path) if val_path else None
        self.val_fraction, self.max_length, self.batch_size = val_fraction, max_length, batch_size
        self.max_tokens = max_tokens
        self.tokens_per_update = tokens_per_update  # read by train() to derive gradient accumulation
        self.num_workers, self.mask_prob, self.seed = num_workers, mask_prob, seed
        self.cache_dir = Path(cache_dir)
        # Page-locked batches copy to a GPU asynchronously; on a CPU-only machine pinning only costs memory.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.splits: dict[str, datasets.Dataset] | None = None
        self.stats: SplitStats | None = None
        self._resume: dict[str, int] | None = None
        self.cluster_map = Path(cluster_map) if cluster_map else None
        if self.cluster_map is not None and not self.cluster_map.is_file():
            raise DataError(
                f"data.cluster_map={cluster_map} does not exist; pass a cluster<TAB>member TSV or UniProt's "
                "idmapping_selected.tab, or data.cluster_map=null for plain sampling"
            )
        self.clusters: ClusterSampler | None = None
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer

    def setup(self, stage: str | None = None) -> None:
        if self.streaming and self.splits is None:  # only the validation file is preprocessed
            self.splits = {"val": load_sequences(self.val_path, self.cache_dir)}
            self.train_files = fasta_files(self.train_path)
            return
        if self.splits is None:
            self.splits, self.stats = load_splits(self.train_path, self.val_path, self.val_fraction, self.cache_dir)
            if self.stats.empty_removed:
                log.warning("skipped %d FASTA records with an empty sequence", self.stats.empty_removed)
        if self.cluster_map is not None and self.clusters is None:
            self.clusters = self._cluster_sampler()

    def _cluster_sampler(self) -> ClusterSampler:
        """ESM-2's UniRef50 cluster sampling over the training rows; their record ids are cached beside the data."""
        key = _cache_key(self.train_path, self.val_path, val_fraction=self.val_fraction, record_ids=True)
        row_ids = load_row_record_ids(self.train_path, self.splits["train"], self.cache_dir / f"{key}.train_ids.arrow")
        return build_cluster_sampler(self.cluster_map, row_ids, self.seed, source=str(self.train_path))

    def state_dict(self) -> dict[str, int]:
        """Where the training data stands (saved in every checkpoint): epoch and batches consumed in it."""
        batches_done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """On resume, the next train loader skips the batches of the interrupted epoch already trained on."""
        self._resume = dict(state)

    def train_tokens(self) -> int | None:
        """Tokens per epoch after cropping; None when streaming (unknown until read)."""
        if self.clusters is not None:  # an epoch is one member per cluster; epoch 0 stands for all of them
            return int(self.token_lengths("train")[self.clusters.epoch_indices(0)].sum())
        return None if self.streaming else int(self.token_lengths("train").sum())

    def _streaming_loader(self, resume: dict[str, int] | None) -> DataLoader:
        num_replicas, rank = self.replicas()
        val_digests = frozenset(
            hashlib.blake2b(decode_ids(ids), digest_size=16).digest()
            for ids in self.splits["val"].with_format("numpy")["input_ids"]
        )
        dataset = StreamingFastaDataset(
            self.train_files,
            self.max_length,
            self.seed,
            self.mask_prob,
            rank=rank,
            world_size=num_replicas,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            exclude=val_digests,  # no validation sequence is trained on
        )
        dataset.batch_size = self.batch_size
        if resume:  # one endless Lightning epoch: skip the batches already trained on
            dataset.skip_batches = resume["batches"]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_unigram_perplexity(self) -> float:
        self.setup()
        return unigram_perplexity(self.splits["val"])

    def token_lengths(self, split: str) -> np.ndarray:
        """Tokens per sample after cropping, <cls>/<eos> included."""
        return np.minimum(residue_lengths(self.splits[split]), self.max_length - 2) + 2

    def replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the Trainer this DataModule serves; (1, 0) outside one."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = MaskedSequenceDataset(self.splits[split], self.max_length, self.seed, self.mask_prob)
        # DDP: the samplers shard each epoch by rank themselves (Trainer use_distributed_sampler=False), since
        # Lightning cannot inject its DistributedSampler into a token-budget batch sampler.
        num_replicas, rank = self.replicas()
        lengths = self.token_lengths(split)
        common = dict(
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        resume, self._resume = (self._resume, None) if shuffle else (None, self._resume)
        # Validation never samples by cluster: it scores every held-out sequence.
        epoch_indices = self.clusters.epoch_indices if shuffle and self.clusters is not None else None
        shared = dict(
            shuffle=shuffle, fixed=not shuffle, epoch_indices=epoch_indices, num_replicas=num_replicas, rank=rank
        )
        if self.max_tokens is not None:
            sampler = TokenBudgetBatchSampler(lengths, self.max_tokens, self.seed, **shared)
            if resume:
                sampler.resume = (resume["epoch"], resume["batches"])
            return DataLoader(dataset, batch_sampler=sampler, **common)
        # Validation in length order, so its batches carry little padding.
        order = None if shuffle else np.argsort(lengths, kind="stable")
        sampler = EpochSampler(len(lengths), self.seed, order=order, **shared)
        if resume:
            sampler.resume = (resume["epoch"], resume["batches"] * self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            resume, self._resume = self._resume, None
            return self._streaming_loader(resume)
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # Masks are fixed (epoch 0) at every evaluation, so val/loss is comparable across steps and runs.
        return self._loader("val", shuffle=False)
