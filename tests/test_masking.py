"""MLM corruption: rates, what may be a target, what random replacements can be, reproducibility."""

import numpy as np
import pytest

from protein_mlm.alphabet import CLS_ID, EOS_ID, MASK_ID, PAD_ID, STANDARD_AMINO_ACID_IDS, encode_residues
from protein_mlm.data.masking import IGNORE_INDEX, collate, crop, mask_tokens, sample_rng

RESIDUES = encode_residues(
    b"MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAG" * 4
)


def _many(n=3000, seed=0):
    return [mask_tokens(RESIDUES, sample_rng(seed, 0, i)) for i in range(n)]


def test_rates_match_esm_recipe():
    examples = _many()
    targets = corrupted_to_mask = corrupted_random = kept = total = 0
    for input_ids, labels in examples:
        is_target = labels != IGNORE_INDEX
        targets += is_target.sum()
        total += len(RESIDUES)
        original = labels[is_target]
        corrupted = input_ids[is_target]
        corrupted_to_mask += (corrupted == MASK_ID).sum()
        kept += (corrupted == original).sum()
        corrupted_random += ((corrupted != MASK_ID) & (corrupted != original)).sum()
    assert targets / total == pytest.approx(0.15, abs=0.002)
    assert corrupted_to_mask / targets == pytest.approx(0.8, abs=0.01)
    # A random replacement equal to the original counts as "kept": 10% + 10% x 1/20 and 10% x 19/20.
    assert kept / targets == pytest.approx(0.1 + 0.1 / 20, abs=0.01)
    assert corrupted_random / targets == pytest.approx(0.1 * 19 / 20, abs=0.01)


def test_special_tokens_are_never_targets_and_random_tokens_are_amino_acids():
    for input_ids, labels in _many(500):
        assert input_ids[0] == CLS_ID and input_ids[-1] == EOS_ID
        assert labels[0] == IGNORE_INDEX and labels[-1] == IGNORE_INDEX
        replaced = (labels != IGNORE_INDEX) & (input_ids != MASK_ID)
        assert np.isin(input_ids[replaced], STANDARD_AMINO_ACID_IDS).all()
        assert np.array_equal(input_ids[labels == IGNORE_INDEX][1:-1], RESIDUES[labels[1:-1] == IGNORE_INDEX])


def test_expected_rate_is_exact_for_short_sequences():
    # 3 residues x 0.15 = 0.45 targets on average: randomised rounding, not always 0.
    counts = [(mask_tokens(RESIDUES[:3], sample_rng(0, 0, i))[1] != IGNORE_INDEX).sum() for i in range(4000)]
    assert np.mean(counts) == pytest.approx(0.45, abs=0.03)


def test_same_key_same_sample_other_key_other_sample():
    a = mask_tokens(RESIDUES, sample_rng(7, 2, 11))
    b = mask_tokens(RESIDUES, sample_rng(7, 2, 11))
    c = mask_tokens(RESIDUES, sample_rng(7, 3, 11))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_crop_is_a_random_window_of_the_requested_length():
    starts = set()
    for i in range(50):
        window = crop(RESIDUES, 100, sample_rng(0, 0, i))
        assert len(window) == 100
        start = next(s for s in range(len(RESIDUES) - 99) if np.array_equal(RESIDUES[s : s + 100], window))
        starts.add(start)
    assert len(starts) > 10
    assert crop(RESIDUES[:50], 100, sample_rng(0, 0, 0)) is not None and len(crop(RESIDUES[:50], 100, None)) == 50


def test_collate_pads_inputs_labels_and_attention_mask():
    batch = collate([mask_tokens(RESIDUES[:5], sample_rng(0, 0, 0)), mask_tokens(RESIDUES[:9], sample_rng(0, 0, 1))])
    assert batch["input_ids"].shape == (2, 11)
    assert (batch["input_ids"][0, 7:] == PAD_ID).all()
    assert (batch["labels"][0, 7:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [7, 11]
