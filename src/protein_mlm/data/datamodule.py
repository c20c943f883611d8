"""Tokenized splits -> masked-LM samples and DataLoaders (token-budget or fixed batches, DDP shares, streaming)."""

import logging
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from protein_mlm.data.clusters import ClusterSampler, load_cluster_sampler
from protein_mlm.data.loader import ResumableLoader, StreamLoader
from protein_mlm.data.masking import IGNORE_INDEX, collate, crop, mask_tokens, sample_rng
from protein_mlm.data.options import check_data_options
from protein_mlm.data.packing import PackedBatches, collate_packed
from protein_mlm.data.preprocess import (
    BUNDLED_FASTA,
    SplitStats,
    cache_key,
    load_sequences,
    load_splits,
    prepare_splits,
    residue_lengths,
    sequences_file,
    splits_dir,
    unigram_perplexity,
)
from protein_mlm.data.readers import has_record_ids
from protein_mlm.data.samplers import EpochSampler, FixedSizeBatches, TokenBudgetBatchSampler, padding_index
from protein_mlm.data.streaming import fasta_files, streaming_loader
from protein_mlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
        packing: bool = False,
        val_max_sequences: int | None = 10_000,
    ):
        super().__init__()
        if not isinstance(packing, bool) or isinstance(num_workers, bool) or not isinstance(num_workers, int):
            raise ConfigError(
                f"ProteinDataModule takes data.packing={packing!r} and data.num_workers={num_workers!r} resolved; "
                "`auto` is resolved by the run plan: build it with protein_mlm.train.build_datamodule(cfg, plan)"
            )
        check_data_options(
            dict(
                max_length=max_length,
                max_tokens=max_tokens,
                batch_size=batch_size,
                val_fraction=val_fraction,
                val_path=val_path,
                mask_prob=mask_prob,
                val_max_sequences=val_max_sequences,
                num_workers=num_workers,
                packing=packing,
                streaming=streaming,
                cluster_map=cluster_map,
                tokens_per_update=tokens_per_update,
            )
        )
        self.train_path = Path(train_path) if train_path else Path(str(BUNDLED_FASTA))
        self.val_path = Path(val_path) if val_path else None
        self.val_fraction, self.max_length, self.batch_size = val_fraction, max_length, batch_size
        self.val_max_sequences = val_max_sequences
        self.max_tokens = max_tokens
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
        if self.cluster_map is not None and not has_record_ids(self.train_path):
            raise ConfigError(
                f"data.cluster_map needs record ids, and {self.train_path} (Parquet) has no `id` column; add one "
                "holding the map's member ids, or set data.cluster_map=null"
            )
        self.clusters: ClusterSampler | None = None
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        self.packing = packing

    def _split_settings(self) -> tuple:
        """The arguments of prepare_splits / load_splits / splits_dir, in their order."""
        paths = self.train_path, self.val_path
        return *paths, self.val_fraction, self.cache_dir, self.cluster_map, self.val_max_sequences

    def prepare_data(self) -> None:
        """Build the Arrow splits and the cluster arrays: Lightning runs this in one process per node (local rank 0;
        with prepare_data_per_node=False, global rank 0 only) while the others wait; `setup` then maps them."""
        if self.streaming:
            load_sequences(self.val_path, self.cache_dir)
            return
        target = prepare_splits(*self._split_settings())
        if self.cluster_map is not None:
            self._cluster_sampler(datasets.Dataset.from_file(str(target / "train.arrow")))

    def prepared(self) -> bool:
        """Whether what prepare_data builds is in the cache already (so `setup` only maps files)."""
        if self.streaming:
            return sequences_file(self.val_path, self.cache_dir).is_file()
        built = (splits_dir(*self._split_settings()) / "stats.json").is_file()
        return built and (self.cluster_map is None or (self._clusters_cache() / "meta.json").is_file())

    def setup(self, stage: str | None = None) -> None:
        """Map the caches (built here only when used outside a Trainer, which calls prepare_data first)."""
        if self.streaming and self.splits is None:  # only the validation file is preprocessed
            self.splits = {"val": load_sequences(self.val_path, self.cache_dir)}
            self.train_files = fasta_files(self.train_path)
            return
        if self.splits is None:
            self.splits, self.stats = load_splits(*self._split_settings())
            if self.stats.empty_removed:
                log.warning("skipped %d FASTA records with an empty sequence", self.stats.empty_removed)
            if self.stats.val_capped:
                log.info(
                    "validation capped at data.val_max_sequences=%d; %d more held-out sequences train instead",
                    self.val_max_sequences,
                    self.stats.val_capped,
                )
        if self.cluster_map is not None and self.clusters is None:
            self.clusters = self._cluster_sampler(self.splits["train"])

    def _clusters_cache(self) -> Path:
        """The cluster arrays' folder: keyed on the map file and the split whose rows they index."""
        split = splits_dir(*self._split_settings()).name
        return self.cache_dir / f"{cache_key(self.cluster_map, split=split, cluster_arrays=True)}.clusters"

    def _cluster_sampler(self, train: datasets.Dataset) -> ClusterSampler:
        """ESM-2's UniRef50 cluster sampling over the training rows, its arrays cached beside the data."""
        return load_cluster_sampler(self.cluster_map, self.train_path, train, self._clusters_cache(), self.seed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """A streamed checkpoint of checkpoint format 2 kept its position here (batches consumed); the training
        loader now keeps it (loader.StreamLoader), and this one is its start when the loader saved none."""
        self._resume = dict(state) if state else None

    def train_tokens(self) -> int | None:
        """Tokens per epoch after cropping; None when streaming (unknown until read)."""
        if self.clusters is not None:  # an epoch is one member per cluster; epoch 0 stands for all of them
            return int(self.token_lengths("train")[self.clusters.epoch_indices(0)].sum())
        return None if self.streaming else int(self.token_lengths("train").sum())

    def _streaming_loader(self, resume: dict[str, int] | None) -> StreamLoader:
        num_replicas, rank = self.replicas()
        loader = streaming_loader(
            self.train_files,
            self.splits["val"],
            self.max_length,
            self.seed,
            self.mask_prob,
            self.batch_size,
            (num_replicas, rank),
            self.num_workers,
            self.shuffle_buffer,
            self.pin_memory,
        )
        return StreamLoader(loader, num_replicas, self.num_workers, start=resume["batches"] if resume else 0)

    def val_unigram_perplexity(self) -> float:
        self.setup()
        return unigram_perplexity(self.splits["val"])

    def token_lengths(self, split: str) -> np.ndarray:
        """Tokens per sample after cropping, <cls>/<eos> included."""
        return np.minimum(residue_lengths(self.splits[split]), self.max_length - 2) + 2

    def replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the Trainer this DataModule serves; (1, 0) outside one."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _batcher(self, split: str, shuffle: bool):
        """The batches of a split: token-budget batches, or `batch_size` samples (validation in length order)."""
        # DDP: the batchers shard each epoch by rank themselves (Trainer use_distributed_sampler=False), since
        # Lightning cannot inject its DistributedSampler into a token-budget batch sampler.
        num_replicas, rank = self.replicas()
        lengths = self.token_lengths(split)
        # Validation never samples by cluster: it scores every held-out sequence.
        epoch_indices = self.clusters.epoch_indices if shuffle and self.clusters is not None else None
        shared = dict(
            shuffle=shuffle, fixed=not shuffle, epoch_indices=epoch_indices, num_replicas=num_replicas, rank=rank
        )
        if self.max_tokens is not None:
            return TokenBudgetBatchSampler(lengths, self.max_tokens, self.seed, **shared)
        if shuffle:
            return FixedSizeBatches(len(lengths), self.batch_size, self.seed, **shared)
        order = np.argsort(lengths, kind="stable")  # validation: little padding
        return EpochSampler(len(lengths), self.seed, order=order, **shared)

    def _dataset(self, split: str) -> MaskedSequenceDataset:
        return MaskedSequenceDataset(self.splits[split], self.max_length, self.seed, self.mask_prob)

    def train_dataloader(self) -> ResumableLoader | StreamLoader:
        if self.streaming:
            resume, self._resume = self._resume, None
            return self._streaming_loader(resume)
        if self.packing:
            return self._packed_loader()
        batcher = self._batcher("train", shuffle=True)
        return ResumableLoader(self._dataset("train"), batcher, collate, self.num_workers, self.pin_memory)

    def _packed_loader(self) -> ResumableLoader:
        """Fixed-shape batches: max_tokens // max_length rows of max_length tokens, whole sequences packed in."""
        num_replicas, rank = self.replicas()
        rows = self.max_tokens // self.max_length
        epoch_indices = self.clusters.epoch_indices if self.clusters is not None else None
        batcher = PackedBatches(
            self.token_lengths("train"),
            rows,
            self.max_length,
            self.seed,
            epoch_indices=epoch_indices,
            num_replicas=num_replicas,
            rank=rank,
        )
        collate_fn = partial(collate_packed, rows=rows, row_tokens=self.max_length, in_order=True)
        return ResumableLoader(self._dataset("train"), batcher, collate_fn, self.num_workers, self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        # Masks are fixed (epoch 0) at every evaluation, so val/loss is comparable across steps and runs.
        sampler = self._batcher("val", shuffle=False)
        common = dict(collate_fn=collate, num_workers=self.num_workers, pin_memory=self.pin_memory)
        common["persistent_workers"] = self.num_workers > 0
        if isinstance(sampler, EpochSampler):
            return DataLoader(self._dataset("val"), batch_size=self.batch_size, sampler=sampler, **common)
        return DataLoader(self._dataset("val"), batch_sampler=sampler, **common)
