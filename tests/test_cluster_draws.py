"""Cluster-sampled epochs serve exactly the drawn rows, whatever the draw looks like: every batching strategy, every
rank split, random cluster maps, and draws that begin with row 0 and end with row K - 1 (which an arange check
mistakes for "every row")."""

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protein_mlm.data.clusters import ClusterSampler
from protein_mlm.data.packing import PackedBatches
from protein_mlm.data.samplers import FixedSizeBatches, TokenBudgetBatchSampler, sort_by_length
from tests.test_clusters import datamodule, served_rows


def test_sort_by_length_keeps_the_rows_it_is_given():
    """Rows [0, 4, 2] of 5 start at 0 and end at len - 1: they are served as themselves, not as 0, 1, 2."""
    lengths = np.array([5, 9, 7, 3, 6], dtype=np.uint16)
    order = sort_by_length(np.array([0, 4, 2]), lengths, np.random.default_rng(0))
    assert order.tolist() == [0, 4, 2]  # ascending length: 5, 6, 7


def batchers(lengths: np.ndarray, draw, world: int, rank: int) -> dict:
    """Every training strategy over the epoch rows `draw(epoch)`, for rank `rank` of `world`."""
    shared = dict(epoch_indices=draw, num_replicas=world, rank=rank)
    longest = int(lengths.max())
    return {
        "fixed": FixedSizeBatches(len(lengths), 3, seed=1, **shared),
        "token_budget": TokenBudgetBatchSampler(lengths, 2 * longest, seed=1, **shared),
        "packed": PackedBatches(lengths, 2, longest, seed=1, **shared),
    }


def assert_serves(lengths: np.ndarray, draw, world: int, epochs=(0, 1)) -> None:
    """Each strategy's ranks together serve the epoch's drawn rows once, and only the rank split's padding twice."""
    for epoch in epochs:
        rows = np.asarray(draw(epoch))
        for name in ("fixed", "token_budget", "packed"):
            whole = batchers(lengths, draw, 1, 0)[name].batches(epoch)
            assert sorted(np.concatenate(list(whole)).tolist()) == sorted(rows.tolist()), name
            shares = [batchers(lengths, draw, world, r)[name].rank_batches(epoch) for r in range(world)]
            served = Counter(int(i) for share in shares for batch in share for i in batch)
            pad = -len(whole) % world  # the rank split wraps past the list's end to give every rank as many
            padding = [whole[p % len(whole)] for p in range(len(whole), len(whole) + pad)]
            expected = Counter(rows.tolist()) + Counter(int(i) for batch in padding for i in batch)
            assert served == expected, name


lengths_st = st.lists(st.integers(3, 40), min_size=1, max_size=60).map(lambda x: np.array(x, dtype=np.uint16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, data=st.data(), world=st.integers(1, 3))
def test_a_draw_from_row_0_to_row_k_minus_1_serves_its_own_rows(lengths, data, world):
    """The draws an arange guess confuses: any K rows in any order, the first 0 and the last K - 1."""
    n = len(lengths)
    k = data.draw(st.integers(1, n))
    middle = data.draw(st.permutations([r for r in range(1, n) if r != k - 1]))[: max(k - 2, 0)]
    rows = np.array(([0] + middle + [k - 1]) if k > 1 else [0], dtype=np.int64)
    assert_serves(lengths, lambda epoch: rows, world, epochs=(0,))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, data=st.data(), world=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_cluster_maps_serve_one_member_of_every_cluster(lengths, data, world, seed):
    """A random partition of the rows into clusters (sizes 1+, members in any order): ClusterSampler's draws."""
    n = len(lengths)
    members = np.array(data.draw(st.permutations(range(n))), dtype=np.int64)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    offsets = np.array([0, *cuts, n])
    sampler = ClusterSampler(offsets, members, seed=seed)
    cluster_of = np.empty(n, dtype=np.int64)
    for c in range(len(offsets) - 1):
        cluster_of[members[offsets[c] : offsets[c + 1]]] = c
    for epoch in (0, 1, 2):
        assert sorted(cluster_of[sampler.epoch_indices(epoch)].tolist()) == list(range(len(offsets) - 1))
    assert_serves(lengths, sampler.epoch_indices, world)


def test_the_datamodule_serves_the_drawn_member_when_the_draw_looks_like_an_arange(tmp_path):
    """Clusters {r0, r3}, {r1, r4}, {r2, r5}: a draw often starts with row 0 and ends with row 2; it must still
    serve the drawn member of the middle cluster (row 4 as often as row 1), through the DataModule's sampler."""
    rng = np.random.default_rng(0)
    residues = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30 + 5 * i)) for i in range(6)]
    fasta, mapping = tmp_path / "train.fasta", tmp_path / "clusters.tsv"
    fasta.write_text("".join(f">r{i}\n{seq}\n" for i, seq in enumerate(residues)))
    mapping.write_text("".join(f"C{i % 3}\tr{i}\n" for i in range(6)))
    dm = datamodule(tmp_path, fasta, mapping)
    arange_like = 0
    for epoch in range(24):
        drawn = dm.clusters.epoch_indices(epoch)
        arange_like += int(drawn[0] == 0 and drawn[-1] == len(drawn) - 1)
        assert sorted(served_rows(dm, epoch)) == sorted(drawn.tolist()), epoch
    assert arange_like > 0  # the case the old guess got wrong did occur
