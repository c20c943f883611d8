"""Scaling: chunked preprocessing equals the in-memory one, rank-sharded samplers, streaming FASTA, DDP, FSDP."""

import gzip
from pathlib import Path

import numpy as np

from protein_mlm.data import BUNDLED_FASTA, build_splits, is_val_sequence
from protein_mlm.fasta import read_fasta
from protein_mlm.tokenizer import encode_residues


def reference_splits(train_path: Path, val_path: Path | None, val_fraction: float):
    """The in-memory preprocessing this project had before it was made to scale (kept here as the oracle)."""

    def unique(path):
        seen, out, total, empty = set(), [], 0, 0
        for _, residues in read_fasta(path):
            total += 1
            if not residues:
                empty += 1
            elif residues not in seen:
                seen.add(residues)
                out.append(residues)
        return out, total - empty - len(out), empty

    train, duplicates, empty = unique(train_path)
    overlap = 0
    if val_path is None:
        val = [s for s in train if is_val_sequence(s, val_fraction)]
        train = [s for s in train if not is_val_sequence(s, val_fraction)]
    else:
        val = unique(val_path)[0]
        kept = [s for s in train if s not in set(val)]
        overlap, train = len(train) - len(kept), kept
    ids = lambda seqs: [encode_residues(s).tolist() for s in seqs]  # noqa: E731
    return {"train": ids(train), "val": ids(val)}, (len(train), len(val), duplicates, empty, overlap)


def as_tuple(stats):
    return (stats.train_sequences, stats.val_sequences, stats.duplicates_removed, stats.empty_removed,
            stats.val_overlap_removed)


def test_chunked_preprocessing_gives_the_same_ids_in_the_same_order(tmp_path, monkeypatch):
    bundled = Path(str(BUNDLED_FASTA))
    expected, expected_stats = reference_splits(bundled, None, 0.03)
    monkeypatch.setattr("protein_mlm.data.CHUNK_RECORDS", 777)  # several chunks, a partial last one
    splits, stats = build_splits(bundled, None, 0.03, out_dir=tmp_path / "bundled")
    assert as_tuple(stats) == expected_stats
    for name in ("train", "val"):
        assert splits[name]["input_ids"] == expected[name]

    # Duplicates, empty records, lower case and a separate validation file that overlaps train.
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWYX"), rng.integers(1, 90))) for _ in range(3000)]
    records = seqs + seqs[::7] + [s.lower() for s in seqs[::11]] + [""] * 5
    order = rng.permutation(len(records))
    train = tmp_path / "t.fasta.gz"
    train.write_bytes(gzip.compress("".join(f">r{i}\n{records[i]}\n" for i in order).encode()))
    val = tmp_path / "v.fasta"
    val.write_text("".join(f">v{i}\n{s}\n" for i, s in enumerate(seqs[5:300:3] + ["MKV", "MKV"])))
    for val_path in (None, val):
        expected, expected_stats = reference_splits(train, val_path, 0.1)
        splits, stats = build_splits(train, val_path, 0.1)
        assert as_tuple(stats) == expected_stats
        assert stats.duplicates_removed > 0 and stats.empty_removed == 5
        for name in ("train", "val"):
            assert splits[name]["input_ids"] == expected[name]
        assert splits["train"].features["input_ids"].feature.dtype == "uint8"
