"""Packed batches (data.packing=true) compute what padded batches compute, sequence by sequence."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import EsmForMaskedLM

from protein_mlm.data import packing
from protein_mlm.data.masking import IGNORE_INDEX, collate, mask_tokens
from protein_mlm.data.packing import SEGMENT_BUCKET, PackedBatches, best_fit_rows, collate_packed, next_fit_rows
from protein_mlm.model import attention
from protein_mlm.model.checkpoints import export_hf
from protein_mlm.model.esm import build_model, esm_config
from protein_mlm.model.packed import packed_logits
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import train
from protein_mlm.training.module import MaskedLMModule
from tests.conftest import compose_config

TINY_ARCH = OmegaConf.to_container(compose_config("model=tiny").model.architecture, resolve=True)
ARCHS = {
    "rotary": {**TINY_ARCH, "max_position_embeddings": 1100},
    "absolute": {**TINY_ARCH, "max_position_embeddings": 1100, "position_embedding_type": "absolute"},
}


def examples(lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [mask_tokens(rng.integers(4, 24, size=n), rng) for n in lengths]


def split_packed(packed: torch.Tensor, lengths: list[int], row_tokens: int) -> list[torch.Tensor]:
    """Per-sequence slices (in example order) of a packed (rows, row_tokens, ...) tensor."""
    pieces = {}
    for row, members in enumerate(best_fit_rows(lengths, len(packed), row_tokens)):
        start = 0
        for position in members:
            pieces[position] = packed[row, start : start + lengths[position]]
            start += lengths[position]
    return [pieces[i] for i in range(len(lengths))]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("position", ["rotary", "absolute"])
def test_packed_logits_and_gradients_equal_padded(position):
    """fp32: logits within 1e-5, gradients within 1e-4 relative; a pad segment without targets changes nothing."""
    torch.manual_seed(0)
    model = build_model(ARCHS[position])
    batch = examples([5, 30, 3, 60, 17, 44])
    lengths = [len(ids) for ids, _ in batch]
    packed, padded = collate_packed(batch, rows=3, row_tokens=80), collate(batch)
    assert packed["labels"][packed["input_ids"].eq(1)].eq(IGNORE_INDEX).all()  # pad segments carry no targets
    assert packed["cu_seqlens"][-1] == 3 * 80  # every token belongs to one segment
    assert len(packed["cu_seqlens"]) == SEGMENT_BUCKET + 1  # 6 sequences + 3 row tails, bucketed

    packed_out = packed_logits(model, packed)
    padded_out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    for i, piece in enumerate(split_packed(packed_out, lengths, 80)):
        torch.testing.assert_close(piece, padded_out[i, : lengths[i]], atol=1e-5, rtol=1e-5)

    grads = []
    for out, labels in ((packed_out, packed["labels"]), (padded_out, padded["labels"])):
        model.zero_grad()
        summed_loss(out, labels).backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_changing_one_sequence_leaves_the_others_unchanged():
    """Attention never crosses a sequence boundary, and token dropout is per sequence (a <mask>-only change)."""
    model = build_model(ARCHS["rotary"])
    batch = examples([20, 25, 30])
    changed = list(batch)
    ids, labels = changed[1]
    changed[1] = (np.where(np.arange(len(ids)) % 2 == 1, 32, ids), labels)  # many more <mask> tokens
    lengths = [len(ids) for ids, _ in batch]
    before = split_packed(packed_logits(model, collate_packed(batch, 1, 90)), lengths, 90)
    after = split_packed(packed_logits(model, collate_packed(changed, 1, 90)), lengths, 90)
    torch.testing.assert_close(before[0], after[0], atol=0, rtol=0)
    torch.testing.assert_close(before[2], after[2], atol=0, rtol=0)
    assert not torch.allclose(before[1], after[1])


def test_a_one_token_and_a_1024_token_sequence_share_a_pack():
    model = build_model(ARCHS["rotary"])
    long_ids, long_labels = examples([1022])[0]
    batch = [(np.array([0]), np.array([IGNORE_INDEX])), (long_ids, long_labels)]
    packed = collate_packed(batch, rows=1, row_tokens=1030)
    assert packed["cu_seqlens"].tolist()[:4] == [0, 1024, 1025, 1030] and packed["max_seqlen"] == 1030
    assert set(packed["cu_seqlens"].tolist()[4:]) == {1030}  # empty segments up to the bucket
    pieces = split_packed(packed_logits(model, packed), [1, 1024], 1030)
    for (ids, _), piece in zip(batch, pieces, strict=True):
        alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
        torch.testing.assert_close(piece, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", attention.PACKED)
def test_every_implementation_allowed_with_packing_keeps_sequences_apart(implementation):
    """fp32: each packed sequence's logits and summed-loss gradients equal the sequence run alone (eager ignores
    cu_seqlens: without its block-diagonal mask a packed neighbour moved the logits by 0.2)."""
    torch.manual_seed(0)
    model = build_model({**ARCHS["rotary"], "attn_implementation": implementation})
    batch = examples([5, 30, 3, 60, 17, 44], seed=1)
    lengths = [len(ids) for ids, _ in batch]
    packed = collate_packed(batch, rows=3, row_tokens=80)
    pieces = split_packed(packed_logits(model, packed), lengths, 80)
    for (ids, _), piece in zip(batch, pieces, strict=True):
        alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
        torch.testing.assert_close(piece, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_packed_rows_never_reach_an_implementation_that_ignores_cu_seqlens(implementation):
    model = build_model(ARCHS["rotary"])
    model.config._attn_implementation = implementation  # what preflight refuses; the forward refuses it too
    with pytest.raises(ValueError, match="sdpa or eager"):
        packed_logits(model, collate_packed(examples([5, 7]), rows=1, row_tokens=16))


def test_padded_batches_match_transformers_sdpa():
    """Our attention name (no host read of the mask) gives transformers' own SDPA result on padded batches."""
    model = build_model(ARCHS["rotary"])
    stock = EsmForMaskedLM(esm_config(ARCHS["rotary"]))
    stock.config._attn_implementation = "sdpa"
    stock.load_state_dict(model.state_dict())
    padded = collate(examples([5, 40, 12]))
    ours = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    theirs = stock(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-6, rtol=1e-6)
    assert model.state_dict().keys() == stock.state_dict().keys()


def test_packed_batches_cover_each_sequence_once_per_epoch_in_fixed_shapes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 129, size=500)
    batcher = PackedBatches(lengths, rows=4, row_tokens=128, seed=0)
    for epoch in (0, 1):
        batches = batcher.rank_batches(epoch)
        served = np.concatenate(batches)
        assert sorted(served.tolist()) == list(range(500))
        assert all(next_fit_rows(lengths[b].tolist(), 4, 128) is not None for b in batches)  # rows as listed
        fill = lengths.sum() / (len(batches) * 4 * 128)
        assert fill > 0.9, fill  # first fit wastes little
    assert [b.tolist() for b in batcher.rank_batches(0)] != [b.tolist() for b in batcher.rank_batches(1)]
    shares = [PackedBatches(lengths, 4, 128, 0, num_replicas=2, rank=r).rank_batches(0) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1])
    assert {i for share in shares for b in share for i in b.tolist()} == set(range(500))


def test_packed_batches_feed_attention_their_real_segments_only():
    """cu_seqlens: the batch's sequences and row tails, then under a bucket of empty ones; max_seqlen bounds all."""
    rng = np.random.default_rng(1)
    # Half short, half long: rows of one long and a few short ones, and rows of many short ones.
    lengths = np.where(rng.random(2000) < 0.5, rng.integers(3, 12, size=2000), rng.integers(100, 200, size=2000))
    batcher = PackedBatches(lengths, rows=8, row_tokens=256, seed=0)
    counts = set()
    for batch in batcher.rank_batches(0):
        packed = collate_packed(examples((lengths[batch] - 2).tolist()), 8, 256, in_order=True)  # + <cls>, <eos>
        cu = packed["cu_seqlens"]
        segments = len(cu) - 1
        assert segments % SEGMENT_BUCKET == 0 and segments < len(batch) + 8 + SEGMENT_BUCKET
        sizes = cu.diff()
        assert int(sizes.gt(0).sum()) <= len(batch) + 8  # real segments: sequences and row tails
        assert packed["max_seqlen"] >= int(sizes.max())  # flash writes no row tail past max_seqlen
        counts.add(segments)
    assert len(counts) > 1  # the count varies with the batch: no fixed worst case


def test_the_packer_keeps_segments_under_the_flash_launch_limit(monkeypatch):
    """Sequences per batch + row tails + the bucket never exceed MAX_SEGMENTS (65,535 on CUDA; 100 here)."""
    monkeypatch.setattr(packing, "MAX_SEGMENTS", 100)
    lengths = np.full(1000, 3)  # 3-token sequences: 8 rows of 256 would hold 680 of them
    batches = PackedBatches(lengths, rows=8, row_tokens=256, seed=0).rank_batches(0)
    assert max(map(len, batches)) == packing.max_sequences_per_batch(8) == 100 - 8 - 63
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))  # the rest wait for later batches
    for batch in batches:
        assert len(collate_packed(examples((lengths[batch] - 2).tolist()), 8, 256, in_order=True)["cu_seqlens"]) <= 101


@pytest.mark.slow  # compiles the packed path (about 30 s of Inductor on CPU)
def test_compiled_packed_path_keeps_few_graphs_over_varying_segment_counts(monkeypatch):
    """50 batches whose segment counts span several buckets, through a varlen kernel of flash's signature (the CPU
    reference), compiled: the same logits as eager and at most 4 graphs in all."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(attention, "varlen_kernel", lambda query, value: attention.varlen_reference)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model(ARCHS["rotary"])
    compiled = build_model(ARCHS["rotary"])
    compiled.load_state_dict(eager.state_dict())
    for layer in compiled.esm.encoder.layer:
        layer.compile(backend="aot_eager")
    rng = np.random.default_rng(0)
    segment_counts = set()
    for i in range(50):
        residues = rng.integers(1, int(rng.choice([3, 12, 60])), size=300)
        keep = sorted({p for row in best_fit_rows((residues + 2).tolist(), 4, 256) for p in row})  # what fits
        batch = collate_packed(examples(residues[keep], seed=i), rows=4, row_tokens=256)
        segment_counts.add(len(batch["cu_seqlens"]) - 1)
        with torch.no_grad():
            torch.testing.assert_close(
                packed_logits(compiled, batch), packed_logits(eager, batch), atol=1e-5, rtol=1e-5
            )
    assert len(segment_counts) >= 3
    assert counters["stats"]["unique_graphs"] <= 4, counters["stats"]


def test_varlen_reference_equals_the_block_diagonal_path():
    """The CPU stand-in for flash's varlen kernel computes what the block-diagonal reference computes."""
    torch.manual_seed(0)
    lengths = [5, 30, 3, 60, 17, 13]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    q, k, v = (torch.randn(1, 4, sum(lengths), 8) for _ in range(3))
    ours = attention.varlen_attention(q, k, v, cu, 60, 0.3, kernel=attention.varlen_reference)
    torch.testing.assert_close(ours, attention.block_diagonal_attention(q, k, v, segment_ids, 0.3))


def test_packed_training_run_logs_and_exports(tiny_cfg, tmp_path):
    """Through Trainer.fit with accumulation: every update logged, fixed batch shape, loss falls, export loads."""
    cfg = tiny_cfg(
        "data.packing=true", "data.max_length=64", "data.max_tokens=512", "trainer.accumulate_grad_batches=2"
    )
    metrics = train(cfg)
    run_dir = tmp_path / "run"
    scalars = read_scalars(run_dir)
    losses = dict(scalars["train/loss"])
    assert sorted(losses) == list(range(12))
    assert all(0.85 < e <= 1.0 for _, e in scalars["perf/padding_efficiency"])  # packed rows are nearly full
    assert metrics["val/loss"] < losses[0]
    out = export_hf(run_dir, tmp_path / "hf")
    exported = EsmForMaskedLM.from_pretrained(out)
    module = MaskedLMModule(architecture=OmegaConf.to_container(cfg.model.architecture, resolve=True))
    assert exported.state_dict().keys() == module.model.state_dict().keys()


@pytest.mark.slow
def test_compiled_layers_match_eager_and_compile_once_for_packed_batches():
    """model.compile with packed batches: fp32 logits and gradients within 1e-5, one graph for 20 batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = MaskedLMModule(architecture=ARCHS["rotary"])
    compiled = MaskedLMModule(architecture=ARCHS["rotary"], compile=True, static_shapes=True)
    compiled.load_state_dict(eager.state_dict())
    rng = np.random.default_rng(0)
    for i in range(20):
        lengths = rng.integers(5, 60, size=int(rng.integers(3, 8)))
        batch = collate_packed(examples(lengths, seed=i), rows=4, row_tokens=128)
        for module in (eager, compiled):
            module.zero_grad()
            loss, _, _ = module._masked_lm(batch)
            loss.backward()
        torch.testing.assert_close(compiled.batch_logits(batch), eager.batch_logits(batch), atol=1e-5, rtol=1e-5)
        for (name, theirs), ours in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            if theirs.grad is not None:
                # Summed-loss gradients reach ~10: fp32 rounding scales with them, so the tolerance does too.
                scale = theirs.grad.abs().max().item()
                torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5 * max(scale, 1), rtol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_without_a_compiler_falls_back_with_a_warning(monkeypatch, caplog):
    from protein_mlm.model import esm as model

    monkeypatch.setattr(model.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert model.can_compile(on_gpu=False) is False
    assert "model.compile ignored: no C++ compiler" in caplog.text
