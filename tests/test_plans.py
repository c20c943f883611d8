"""Epoch plans: the vectorised strategies keep their documented semantics, each epoch is planned once per rank even
across a boundary read ahead by workers, and the loader's position costs O(1) per update."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from protein_mlm.data import packing
from protein_mlm.data.loader import ResumableLoader
from protein_mlm.data.packing import PackedBatches, next_fit_rows
from protein_mlm.data.samplers import FixedSizeBatches, TokenBudgetBatchSampler, greedy_cuts, sort_by_length
from protein_mlm.errors import ConfigError

LENGTHS = np.minimum(np.random.default_rng(0).lognormal(np.log(60), 0.6, size=3001).astype(int), 126) + 2


def planners(world: int, rank: int, epoch_indices=None) -> dict:
    """One planner per strategy, for rank `rank` of `world`."""
    shared = dict(epoch_indices=epoch_indices, num_replicas=world, rank=rank)
    return {
        "fixed": FixedSizeBatches(len(LENGTHS), 16, seed=1, **shared),
        "token_budget": TokenBudgetBatchSampler(LENGTHS, 1024, seed=1, **shared),
        "packed": PackedBatches(LENGTHS, 8, 128, seed=1, **shared),
    }


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("clustered", [False, True])
def test_every_strategy_serves_each_row_once_in_disjoint_equal_shares(world, clustered):
    """Each epoch row once (wrapped padding apart), equal batch counts per rank, budgets and rows respected."""
    # Cluster sampling stands in as "every other row, shifted by the epoch".
    epoch_indices = (lambda epoch: np.arange(epoch % 2, len(LENGTHS), 2)) if clustered else None
    for epoch in (0, 1):
        rows = np.arange(len(LENGTHS)) if epoch_indices is None else epoch_indices(epoch)
        for name in ("fixed", "token_budget", "packed"):
            shares = [planners(world, r, epoch_indices)[name].rank_batches(epoch) for r in range(world)]
            assert len({len(share) for share in shares}) == 1, name  # ranks step together
            everything = planners(1, 0, epoch_indices)[name].batches(epoch)
            assert sorted(np.concatenate(list(everything)).tolist()) == sorted(rows.tolist()), name
            # Rank r serves batches r, r + W, ... of the single planner's list; the padding repeats its start.
            padded = list(everything) + list(everything)[: -len(everything) % world]
            for r, share in enumerate(shares):
                assert [b.tolist() for b in share] == [b.tolist() for b in padded[r::world]], name
            for batch in everything:
                if name == "token_budget":
                    assert len(batch) * LENGTHS[batch].max() <= 1024
                if name == "fixed":
                    assert len(batch) <= 16
                if name == "packed":
                    assert next_fit_rows(LENGTHS[batch].tolist(), 8, 128) is not None  # rows of <= 128, as listed


def test_new_epochs_differ_and_the_same_seed_plans_the_same():
    for name, planner in planners(1, 0).items():
        first, again = planner.batches(0), planners(1, 0)[name].batches(0)
        assert [b.tolist() for b in first] == [b.tolist() for b in again], name
        assert [b.tolist() for b in first] != [b.tolist() for b in planner.batches(1)], name


def test_the_packer_respects_the_segment_cap(monkeypatch):
    monkeypatch.setattr(packing, "MAX_SEGMENTS", 120)  # 120 - 8 rows - 63 = 49 sequences a batch
    lengths = np.random.default_rng(2).integers(3, 9, size=5000)
    batches = PackedBatches(lengths, rows=8, row_tokens=256, seed=0).rank_batches(0)
    assert max(map(len, batches)) <= packing.max_sequences_per_batch(8) == 49
    assert sorted(np.concatenate(list(batches)).tolist()) == list(range(5000))


def test_vectorised_token_budget_equals_the_per_item_loop():
    """The loop it replaced: lexsort by (length, tie-break) and a cut whenever one more item overflows."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        lengths = rng.integers(3, int(rng.integers(4, 300)), size=int(rng.integers(1, 2000))).astype(np.uint16)
        max_tokens = int(rng.integers(int(lengths.max()), 3000))
        tie_break = np.random.default_rng(7).permutation(len(lengths))
        order = np.lexsort((tie_break, lengths))
        assert (sort_by_length(np.arange(len(lengths)), lengths, np.random.default_rng(7)) == order).all()
        cuts, start = [0], 0
        for end in range(1, len(order) + 1):
            if end == len(order) or (end - start + 1) * lengths[order[end]] > max_tokens:
                cuts.append(end)
                start = end
        assert greedy_cuts(lengths[order], max_tokens).tolist() == cuts


class Tokens(Dataset):
    """A sample is its (epoch, index) key: what the loader asked for."""

    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, key):
        return key


def keys(batch):
    return {"keys": torch.tensor(batch)}


@pytest.mark.parametrize("strategy", ["fixed", "token_budget", "packed"])
def test_each_epoch_is_planned_once_across_boundaries_with_workers(strategy):
    """2 workers prefetching, commits trailing the reads by 3 batches, a checkpoint at every step: one plan per
    epoch; the served keys are the plan's batches; commit never plans."""
    batcher = planners(2, 1)[strategy]
    loader = ResumableLoader(Tokens(), batcher, keys, num_workers=2, pin_memory=False)
    counts = [len(batcher.rank_batches(e)) for e in range(3)]
    batcher.plans_built.clear()
    batcher._plans.clear()
    trailing = []
    for batch in loader:
        epoch, index = batch["data_position"]
        assert batch["keys"][:, 0].eq(epoch).all()
        assert batch["keys"][:, 1].tolist() == batcher.rank_batches(epoch)[index].tolist()
        trailing.append((epoch, index))
        if len(trailing) > 3:
            loader.commit(trailing.pop(0))
            loader.state_dict()
        if epoch == 2 and index == counts[2] - 1:
            break
    assert (loader.epoch, loader.batch) == (2, counts[2] - 3)  # three read, not yet committed
    assert set(batcher.plans_built.values()) == {1} and {0, 1, 2} <= set(batcher.plans_built)


def test_commit_and_state_never_touch_an_epoch_they_know():
    batcher = planners(2, 0)["token_budget"]
    loader = ResumableLoader(Tokens(), batcher, keys, num_workers=0, pin_memory=False)
    iterator = iter(loader)
    next(iterator)  # the stream enters epoch 0
    calls, plan = [], batcher.rank_batches
    batcher.rank_batches = lambda epoch: calls.append(epoch) or plan(epoch)
    for index in range(len(plan(0))):
        loader.commit((0, index))
        loader.state_dict()
    assert loader.epoch == 1 and calls == [1]  # only the next epoch's count, once (prepared in the background)
    assert batcher.plans_built == {0: 1, 1: 1}


def test_an_old_checkpoint_resumes_only_into_an_unchanged_order():
    old = {"format": 1, "epoch": 0, "batch": 2}
    token_budget = planners(1, 0)["token_budget"]
    loader = ResumableLoader(Tokens(), token_budget, keys, 0, False)
    loader.load_state_dict({**old, "batches_in_epoch": len(token_budget.rank_batches(0))})
    assert (loader.epoch, loader.batch) == (0, 2)
    for name, order in (("fixed", "fixed_size"), ("packed", "packed")):
        batcher = planners(1, 0)[name]
        with pytest.raises(ConfigError, match=f"planned as {order}/1, this version plans {order}/2") as info:
            ResumableLoader(Tokens(), batcher, keys, 0, False).load_state_dict({**old, "batches_in_epoch": 1})
        assert "\n" not in str(info.value)
