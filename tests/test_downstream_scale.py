"""Zero-shot scoring at ProteinGym scale: any window length (ProteinGym's windows), DDP splits equal to one process."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protein_mlm.inference import zero_shot
from protein_mlm.inference.loading import load_model
from protein_mlm.inference.tracking import Scan, passes_per_validation
from protein_mlm.inference.zero_shot import merge_parts, optimal_window, parse_mutant, rank_part, score_mutants
from tests.test_downstream import OFFSET, WILD_TYPE, dms_frame, fair_esm, hf_dir  # noqa: F401 (fixtures)

FIXTURE_SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(hf_dir):  # noqa: F811
    return load_model(hf_dir).model


def get_optimal_window(mutation_position_relative, seq_len_wo_special, model_window):
    """ProteinGym's proteingym/utils/scoring_utils.py, verbatim."""
    half_model_window = model_window // 2
    if seq_len_wo_special <= model_window:
        return [0, seq_len_wo_special]
    elif mutation_position_relative < half_model_window:
        return [0, model_window]
    elif mutation_position_relative >= seq_len_wo_special - half_model_window:
        return [seq_len_wo_special - model_window, seq_len_wo_special]
    else:
        return [
            max(0, mutation_position_relative - half_model_window),
            min(seq_len_wo_special, mutation_position_relative + half_model_window),
        ]


def proteingym_masked(model, tokens, position, window):
    """ProteinGym's masked-marginals step on the fair-esm model: mask one token, cut its optimal window, read it."""
    masked = tokens.clone()
    masked[0, position] = model.alphabet.mask_idx
    start, end = get_optimal_window(position, tokens.shape[1], window)
    with torch.no_grad():
        lp = torch.log_softmax(model(masked[:, start:end])["logits"], dim=-1)
    return lp[0, position - start]


def reference(model, mutants_text, strategy, window):
    """ProteinGym's masked-marginals (label_row sums) or the corrected pseudo-ppl, every pass in its window."""
    alphabet = model.alphabet
    convert = alphabet.get_batch_converter()
    if strategy == "masked-marginals":
        tokens = convert([("p", WILD_TYPE)])[2]
        sites = {int(m[1:-1]) - OFFSET for text in mutants_text for m in text.split(":")}
        lp = {i: proteingym_masked(model, tokens, i + 1, window) for i in sites}
        scores = []
        for text in mutants_text:
            parts = [(m[0], int(m[1:-1]) - OFFSET, m[-1]) for m in text.split(":")]
            scores.append(sum(float(lp[i][alphabet.get_idx(mt)] - lp[i][alphabet.get_idx(wt)]) for wt, i, mt in parts))
        return np.array(scores)
    scores = []
    for text in mutants_text:
        seq = list(WILD_TYPE)
        for m in text.split(":"):
            seq[int(m[1:-1]) - OFFSET] = m[-1]
        tokens = convert([("p", "".join(seq))])[2]
        lps = [proteingym_masked(model, tokens, i + 1, window)[alphabet.get_idx(a)] for i, a in enumerate(seq)]
        scores.append(float(sum(lps)))
    return np.array(scores)


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 1100), st.integers(3, 1100), st.data())
def test_windows_are_proteingym_get_optimal_window(length, window, data):
    position = data.draw(st.integers(0, length - 1))
    assert list(optimal_window(position, length, window)) == get_optimal_window(position, length, window)


@FIXTURE_SETTINGS
@given(window=st.integers(5, 36), strategy=st.sampled_from(["masked-marginals", "pseudo-ppl"]))
def test_odd_and_even_windows_equal_proteingym(fair_esm, model, window, strategy):  # noqa: F811
    """A window shorter than the protein (37 tokens): odd ones give edge windows one token longer than middle ones."""
    mutants_text = dms_frame()["mutant"].tolist()[-4 if strategy == "masked-marginals" else -1 :]  # multi-mutants
    mutants = [parse_mutant(m, WILD_TYPE, OFFSET, "row") for m in mutants_text]
    ours = score_mutants(model, WILD_TYPE, mutants, strategy, window=window, toks_per_batch=64)
    np.testing.assert_allclose(ours, reference(fair_esm, mutants_text, strategy, window), rtol=0, atol=1e-4)


@pytest.mark.parametrize("window", [51, 50])
def test_window_51_on_100_residues_runs(model, window):
    """The issue's case: window 51 on 100 residues raised "stack expects each tensor to be equal size"."""
    sequence = (WILD_TYPE * 3)[:100]
    mutants = [[zero_shot.Mutation(i, sequence[i], "A" if sequence[i] != "A" else "W")] for i in range(100)]
    assert np.isfinite(score_mutants(model, sequence, mutants, "masked-marginals", window=window)).all()
    assert np.isfinite(score_mutants(model, sequence, mutants[:1], "pseudo-ppl", window=window)).all()


@pytest.mark.parametrize("strategy", ["wt-marginals", "masked-marginals", "pseudo-ppl"])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_parts_merge_to_one_process_and_split_the_work(model, strategy, world, monkeypatch):
    """Each rank reads only its share (sites for masked-marginals); merged, the parts equal one process's scores,
    and the plan table's per-rank passes are what rank 0 really ran."""
    mutants = [parse_mutant(m, WILD_TYPE, OFFSET, "row") for m in dms_frame()["mutant"]]
    mutants = mutants[-7:] if strategy == "pseudo-ppl" else mutants  # pseudo-ppl: 35 passes per mutant
    single = score_mutants(model, WILD_TYPE, mutants, strategy, window=20)
    passes = []
    original = zero_shot.log_probs_at

    def counting(model, tokens, targets):
        passes[-1] += len(tokens)
        return original(model, tokens, targets)

    monkeypatch.setattr(zero_shot, "log_probs_at", counting)
    parts = []
    for rank in range(world):
        passes.append(0)
        parts.append(rank_part(model, WILD_TYPE, mutants, strategy, rank, world, window=20))
    np.testing.assert_allclose(merge_parts(mutants, strategy, parts), single, rtol=0, atol=1e-6)
    if strategy != "wt-marginals":  # wt-marginals reads the wild type once per rank, no masked copies
        sites = len({m.index for mutant in mutants for m in mutant})
        total = sites if strategy == "masked-marginals" else len(WILD_TYPE) * len(mutants)
        assert sum(passes) == total  # nothing scored twice
        scan = Scan("demo", WILD_TYPE, mutants, np.zeros(len(mutants)))
        assert passes[0] == max(passes) == passes_per_validation([scan], strategy, world)
