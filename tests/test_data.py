"""FASTA validation, dedup and split, the Arrow cache, samplers and the DataModule's batches."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from protein_mlm.alphabet import PAD_ID, load_tokenizer
from protein_mlm.data import preprocess
from protein_mlm.data.datamodule import ProteinDataModule
from protein_mlm.data.fasta import read_fasta
from protein_mlm.data.masking import IGNORE_INDEX
from protein_mlm.data.preprocess import build_splits, is_val_sequence, load_splits
from protein_mlm.data.samplers import EpochSampler, TokenBudgetBatchSampler
from protein_mlm.errors import ConfigError, DataError


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_reads_multiline_records_and_gzip(tmp_path):
    text = b">a desc\nMKT\nayi\n\n>b\nGG\n"
    plain = write(tmp_path, "x.fasta", text)
    zipped = write(tmp_path, "x.fa.gz", gzip.compress(text))
    assert list(read_fasta(plain)) == list(read_fasta(zipped)) == [("a", b"MKTAYI"), ("b", b"GG")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.fasta", b"", "is empty"),
        ("plain.txt", b"hello world\n", "before the first '>'"),
        ("noheader.fasta", b"\n\n", "no FASTA records"),
        ("binary.bin", b">a\nMK\x00\x01\x02", "binary file"),
        ("latin1.fasta", b">a\nMK\xe9\xff\n", "binary or non-UTF-8"),
        ("bad.fasta", b">a\nMKT\n>b\nMKJT\n", r"bad.fasta:4:3: invalid residue character 'J'"),
        ("trunc.fasta.gz", gzip.compress(b">a\nMKT\n" * 100)[:-20], "cannot read"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as info:
        list(read_fasta(path))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_fasta(tmp_path / "nope.fasta"))


def test_dedup_and_hash_split_are_deterministic_and_order_free(tmp_path):
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30)) for _ in range(400)]
    records = [f">s{i}\n{s}\n" for i, s in enumerate(seqs + seqs[:50])]  # 50 exact duplicates
    forward = write(tmp_path, "f.fasta", "".join(records).encode())
    backward = write(tmp_path, "b.fasta", "".join(reversed(records)).encode())
    splits_f, stats = build_splits(forward, None, 0.1)
    splits_b, _ = build_splits(backward, None, 0.1)
    assert stats.duplicates_removed == 50
    assert stats.train_sequences + stats.val_sequences == 400
    assert 20 < stats.val_sequences < 60
    as_set = lambda ds: {bytes(np.asarray(r, dtype=np.uint8)) for r in ds["input_ids"]}  # noqa: E731
    assert as_set(splits_f["val"]) == as_set(splits_b["val"])
    assert not as_set(splits_f["val"]) & as_set(splits_f["train"])
    from protein_mlm.alphabet import VOCAB

    decode = lambda ids: "".join(VOCAB[i] for i in ids).encode()  # noqa: E731
    assert all(is_val_sequence(decode(r), 0.1) for r in splits_f["val"]["input_ids"])
    assert not any(is_val_sequence(decode(r), 0.1) for r in splits_f["train"]["input_ids"])


def test_empty_records_are_skipped_and_counted(tmp_path):
    fasta = write(tmp_path, "e.fasta", b">a\nMKT\n>empty\n>b\nGGA\n")
    _, stats = build_splits(fasta, write(tmp_path, "v.fasta", b">v\nWW\n"), 0.5)
    assert (stats.empty_removed, stats.train_sequences) == (1, 2)


def test_separate_val_file_is_removed_from_train(tmp_path):
    train = write(tmp_path, "t.fasta", b">a\nMKT\n>b\nGGA\n>c\nWWW\n")
    val = write(tmp_path, "v.fasta", b">x\nGGA\n")
    splits, stats = build_splits(train, val, 0.5)
    assert (stats.train_sequences, stats.val_sequences, stats.val_overlap_removed) == (2, 1, 1)


def test_cache_is_reused_and_tokens_match_the_esm_tokenizer(tmp_path, monkeypatch):
    fasta = write(tmp_path, "t.fasta", b">a\nMKTAYIAKQR\n>b\nGGAWC\n>c\nLLLXBZ\n")
    val = write(tmp_path, "v.fasta", b">v\nMKV\n")
    cache = tmp_path / "cache"
    splits, stats = load_splits(fasta, val, 0.0, cache)
    assert len(list(cache.iterdir())) == 1

    def must_not_rebuild(*args):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(preprocess, "build_splits", must_not_rebuild)
    again, stats_again = load_splits(fasta, val, 0.0, cache)
    assert stats_again == stats and again["train"]["input_ids"] == splits["train"]["input_ids"]

    tokenizer = load_tokenizer()
    assert len(tokenizer) == 33
    assert list(splits["train"][0]["input_ids"]) == tokenizer("MKTAYIAKQR", add_special_tokens=False)["input_ids"]
    assert splits["train"].features["input_ids"].feature.dtype == "uint8"  # 1 byte per residue


def test_epoch_sampler_reshuffles_per_epoch_and_covers_everything():
    sampler = EpochSampler(100, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(i for _, i in first) == sorted(i for _, i in second) == list(range(100))
    assert [i for _, i in first] != [i for _, i in second]


def test_token_budget_batches_fit_the_budget_cover_each_sample_once_and_reshuffle():
    lengths = np.random.default_rng(0).integers(10, 300, size=1000)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=1024, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        indices = [i for batch in batches for _, i in batch]
        assert sorted(indices) == list(range(1000))
        for batch in batches:
            assert len(batch) * max(lengths[i] for _, i in batch) <= 1024
        epochs.append([tuple(i for _, i in b) for b in batches])
    assert epochs[0] != epochs[1]


def test_token_budget_below_max_length_is_a_config_error():
    with pytest.raises(ConfigError, match="max_tokens"):
        ProteinDataModule(max_length=1024, max_tokens=512)


def test_datamodule_batches_and_padding_efficiency(cache_dir):
    dm = ProteinDataModule(max_length=1024, max_tokens=8192, cache_dir=str(cache_dir))
    dm.setup()
    assert dm.stats.train_sequences + dm.stats.val_sequences == 10_545 - dm.stats.duplicates_removed
    loader = dm.train_dataloader()
    real = padded = 0
    for n, batch in enumerate(loader):
        assert batch["input_ids"].shape[1] <= 1024
        assert batch["input_ids"].numel() <= 8192
        real += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
        if n == 200:
            break
    assert real / padded >= 0.9
    assert 15 < dm.val_unigram_perplexity() < 20


def test_validation_masks_are_fixed_across_epochs(cache_dir):
    dm = ProteinDataModule(max_length=128, max_tokens=2048, cache_dir=str(cache_dir))
    dm.setup()
    first = next(iter(dm.val_dataloader()))
    loader = dm.val_dataloader()
    loader.batch_sampler.set_epoch(5)  # Lightning does this before each evaluation
    again = next(iter(loader))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in ("input_ids", "labels"))
    assert first["counts"] == again["counts"]
    assert (first["labels"] != IGNORE_INDEX).any() and (first["input_ids"] != PAD_ID).all(dim=1).any()


def random_fasta(path: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    path.write_text("".join(f">s{i}\n{rng.choice(letters, 30).tobytes().decode()}\n" for i in range(count)))
    return path


def test_val_max_sequences_keeps_the_first_held_out_and_trains_the_rest(tmp_path):
    fasta = random_fasta(tmp_path / "r.fasta", 200)
    full, _ = build_splits(fasta, None, 0.5, tmp_path / "full")
    capped, stats = build_splits(fasta, None, 0.5, tmp_path / "capped", val_max_sequences=10)
    held_out = list(full["val"]["input_ids"])
    assert list(capped["val"]["input_ids"]) == held_out[:10]  # the first ten held out, in file order
    assert stats.val_capped == len(held_out) - 10 and stats.val_sequences == 10
    train = {tuple(x) for x in capped["train"]["input_ids"]}
    assert train == {tuple(x) for x in list(full["train"]["input_ids"]) + held_out[10:]}  # nothing lost, nothing leaks


def test_val_max_sequences_keeps_whole_clusters_on_one_side(tmp_path):
    fasta = random_fasta(tmp_path / "r.fasta", 300, seed=1)
    cluster_of = {f"s{i}": f"C{i % 40}" for i in range(300)}  # 40 clusters of 7-8 members, interleaved
    splits, stats = build_splits(fasta, None, 0.5, tmp_path / "out", cluster_of=cluster_of, val_max_sequences=5)
    sequences = {residues: record_id for record_id, residues in read_fasta(fasta)}
    side = {}
    for split in ("train", "val"):
        for ids in splits[split]["input_ids"]:
            residues = preprocess.decode_ids(np.array(ids, dtype=np.uint8))
            side.setdefault(cluster_of[sequences[residues]], set()).add(split)
    assert all(len(sides) == 1 for sides in side.values())  # no cluster straddles the split
    val_clusters = [c for c, sides in side.items() if sides == {"val"}]
    assert len(val_clusters) == 5 and stats.val_sequences > 5 and stats.val_capped > 0


def test_prepare_data_builds_once_and_setup_only_maps(tmp_path, monkeypatch):
    fasta = random_fasta(tmp_path / "r.fasta", 120, seed=2)
    mapping = tmp_path / "map.tsv"
    mapping.write_text("".join(f"C{i % 9}\ts{i}\n" for i in range(120)))
    settings = dict(train_path=str(fasta), val_fraction=0.2, max_length=64, max_tokens=256, cluster_map=str(mapping))
    builder = ProteinDataModule(**settings, cache_dir=str(tmp_path / "cache"))
    assert not builder.prepared()
    builder.prepare_data()
    assert builder.prepared() and builder.splits is None  # built, not loaded: the hook runs on one process only
    for name in ("build_splits", "record_clusters"):
        monkeypatch.setattr(preprocess, name, lambda *a, **k: pytest.fail("setup rebuilt the splits"))
    monkeypatch.setattr("protein_mlm.data.clusters.row_record_ids", lambda *a: pytest.fail("setup rebuilt clusters"))
    mapper = ProteinDataModule(**settings, cache_dir=str(tmp_path / "cache"))
    mapper.setup()
    assert len(mapper.splits["train"]) + len(mapper.splits["val"]) == 120 and len(mapper.clusters) > 0
