"""FASTA read lazily as an endless stream (`data.streaming=true`), for data too big to preprocess.

The files become a `datasets.IterableDataset` whose shards are (file, part) pairs: a file's part p of P holds its
records with index % P == p. P is chosen so the shards divide evenly over ranks x DataLoader workers, so a
directory of shards splits by file (P = 1 when the file count is a multiple of the readers) and a single gzip
file splits by record index (every reader decompresses the whole file and keeps its own records). Each
reader (a rank's DataLoader worker) takes its shards with `split_dataset_by_node` over ranks x workers, and
`datasets` shuffles shard order and a buffer per epoch. Each reader loops over its shards epoch after epoch,
so every rank steps forever, in lockstep, until `trainer.max_steps`; crop and mask come from (seed, epoch,
record key), as in the preprocessed path. A resume continues exactly where the run stopped (`_reader`), on the
same readers: loader.StreamLoader saves the position and refuses another world size or worker count.

A stream's epoch is each reader's own pass over its shards: reader r is in epoch e while it reads its shards for
the (e+1)-th time. Readers serve equal batch counts but their shares differ by up to one shard's worth of records,
so the readers of one rank (and the ranks) cross their epoch boundaries at different batches.
"""

import math
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from protein_mlm.alphabet import encode_residues
from protein_mlm.data.fasta import sequence_digest
from protein_mlm.data.masking import collate, crop, mask_tokens, sample_rng
from protein_mlm.data.preprocess import decode_ids
from protein_mlm.data.readers import PARQUET_SUFFIXES, read_sequences
from protein_mlm.errors import ConfigError, DataError

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fasta.gz", ".fa.gz", ".faa.gz", ".fas.gz")
SHARD_SUFFIXES = FASTA_SUFFIXES + PARQUET_SUFFIXES
RECORD_KEY_BITS = 40  # key = file number << 40 | record number: unique for up to 10^12 records per file
STREAM_FEATURES = datasets.Features({"key": datasets.Value("int64"), "residues": datasets.Value("binary")})


def fasta_files(path: Path) -> list[Path]:
    """`path` itself, or the FASTA files of a directory of shards in name order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES))
    if not files:
        suffixes = ", ".join(SHARD_SUFFIXES)
        raise DataError(f"{path} holds no FASTA or Parquet files ({suffixes}); pass a file or a directory of them")
    return files


def _shard_records(shards: list[tuple[int, str, int, int]], exclude: frozenset[bytes]) -> Iterator[dict]:
    """Records of (file number, path, part, parts) shards; empty ones and those in `exclude` (digests) skipped."""
    for number, path, part, parts in shards:
        for index, (_, residues) in enumerate(read_sequences(path)):
            if index % parts != part or not residues:
                continue
            if exclude and sequence_digest(residues) in exclude:
                continue
            yield {"key": number << RECORD_KEY_BITS | index, "residues": residues}


class StreamingFastaDataset(torch.utils.data.IterableDataset):
    """Endless masked-LM samples from FASTA files, this rank's and this worker's share of every epoch."""

    def __init__(
        self,
        files: list[Path],
        max_length: int,
        seed: int,
        mask_prob: float = 0.15,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 10_000,
        exclude: frozenset[bytes] = frozenset(),
        epochs: int | None = None,
    ):
        self.max_residues, self.seed, self.mask_prob = max_length - 2, seed, mask_prob
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.skip_batches, self.batch_size = 0, 1  # resume: batches of this rank already trained on
        readers = world_size * max(num_workers, 1)
        parts = readers // math.gcd(len(files), readers)  # len(files) * parts is a multiple of the readers
        shards = [(n, str(f), p, parts) for n, f in enumerate(files) for p in range(parts)]
        self.records_stream = datasets.IterableDataset.from_generator(
            _shard_records, features=STREAM_FEATURES, gen_kwargs={"shards": shards, "exclude": exclude}
        )
        self.shuffle_buffer = shuffle_buffer
        self.num_shards = len(shards)

    def _reader(self) -> tuple[int, int, int]:
        """(the reader this process plays, the rank's readers, the batches it skips on resume).

        DataLoader takes batches from its workers in turn, starting with worker 0; after a resume that skips B
        batches, the next batch is B, which reader B % W served in the uninterrupted run. So worker slot s plays
        reader (B + s) % W, which had served (B + s) // W batches: the resumed run continues exactly where it
        stopped, for any number of workers.
        """
        info = torch.utils.data.get_worker_info()
        slot, readers = (info.id, info.num_workers) if info is not None else (0, 1)
        return (self.skip_batches + slot) % readers, readers, (self.skip_batches + slot) // readers

    def epoch_stream(self, epoch: int, reader: int = 0, readers: int = 1) -> datasets.IterableDataset:
        """This reader's rows of one epoch, shard order and buffer shuffled from (seed, epoch).

        A new stream per epoch rather than `set_epoch`: `datasets` keeps the epoch in memory shared by the
        DataLoader workers, so a worker entering the next epoch would reshuffle the shards of one still in this one.
        """
        stream = self.records_stream
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed * 1_000_003 + epoch, buffer_size=self.shuffle_buffer)
        return split_dataset_by_node(stream, rank=self.rank * readers + reader, world_size=self.world_size * readers)

    def records(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, record key, token ids) of this reader's share, epoch after epoch (`epochs` of them, or forever)."""
        reader, readers, skip_batches = self._reader()
        skip = skip_batches * self.batch_size
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            served = False
            # Read as in the main process: in a DataLoader worker `datasets` would split by the worker's slot,
            # while the split here is by the reader the slot plays (`_reader`).
            for row in self.epoch_stream(epoch, reader, readers).iter(batch_size=1):
                served = True
                if skip:
                    skip -= 1
                    continue
                yield epoch, row["key"][0], encode_residues(row["residues"][0])
            if not served:
                raise DataError("the streamed FASTA data holds no sequences for this reader; use fewer workers")
            epoch += 1

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for epoch, key, residues in self.records():
            rng = sample_rng(self.seed, epoch, key)
            yield mask_tokens(crop(residues, self.max_residues, rng), rng, mask_prob=self.mask_prob)


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


def streaming_loader(
    train_files,
    val_split,
    max_length,
    seed,
    mask_prob,
    batch_size,
    replicas,
    num_workers,
    shuffle_buffer,
    pin_memory,
) -> DataLoader:
    """The training DataLoader over the streamed FASTA files; sequences of the validation split are skipped."""
    num_replicas, rank = replicas
    val_digests = frozenset(sequence_digest(decode_ids(ids)) for ids in val_split.with_format("numpy")["input_ids"])
    dataset = StreamingFastaDataset(
        train_files,
        max_length,
        seed,
        mask_prob,
        rank=rank,
        world_size=num_replicas,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        exclude=val_digests,  # no validation sequence is trained on
    )
    dataset.batch_size = batch_size  # what a resume's skip counts in (loader.StreamLoader sets skip_batches)
    return DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory
    )
