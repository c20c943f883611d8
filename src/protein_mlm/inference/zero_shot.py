"""Zero-shot variant-effect scores in fair-esm predict.py's and ProteinGym's conventions.

A mutant `A42G` names sequence index 42 - offset; `A42G:C50D` scores the sum over its sites (ProteinGym).
- wt-marginals: log p(mt) - log p(wt) at each site, from one pass over the unmasked wild type.
- masked-marginals: the same, from the wild type with that one site masked (one masked copy per site).
- pseudo-ppl: sum over every residue i of the mutant sequence of log p(residue i | sequence with i masked).
  predict.py and ProteinGym read residue i at token i (off by one: token 0 is <cls>) and skip the last two
  residues; here token i + 1 is scored for residue i, every residue counted.
Sequences longer than the model window (tokens, <cls>/<eos> included) are scored as ProteinGym does: each masked
site in its "optimal" window (`get_optimal_window`), or, for wt-marginals, "overlapping" weighted windows.
"""

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import EsmForMaskedLM

from protein_mlm.alphabet import CLS_ID, EOS_ID, MASK_ID, RESIDUES, VOCAB
from protein_mlm.errors import DataError

STRATEGIES = ("wt-marginals", "masked-marginals", "pseudo-ppl")
WINDOWS = ("optimal", "overlapping")
MUTATION = re.compile(r"^([A-Z])(-?\d+)([A-Z])$")


@dataclass(frozen=True)
class Mutation:
    index: int  # 0-based index into the wild-type sequence
    wt: str
    mt: str


def check_sequence(sequence: str) -> str:
    """The wild type, upper-case; only letters of the ESM alphabet."""
    sequence = sequence.strip().upper()
    bad = sorted(set(sequence) - set(RESIDUES))
    if not sequence or bad:
        raise DataError(
            f"--sequence holds {'no residues' if not sequence else 'the letters ' + ''.join(bad)}; "
            f"pass the wild-type protein in the letters {RESIDUES}"
        )
    return sequence


def parse_mutant(text, sequence: str, offset: int, where: str) -> list[Mutation]:
    """`A42G` or `A42G:C50D` against `sequence`; every problem is a DataError naming `where` (the row)."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: no mutant given; each row needs one such as A42G or A42G:C50D")
    mutations = []
    for part in text.strip().split(":"):
        match = MUTATION.match(part.strip())
        if not match or match.group(3) not in RESIDUES:
            raise DataError(f"{where}: malformed mutant {text!r}; write wild type, position, mutant: A42G or A42G:C50D")
        wt, position, mt = match.group(1), int(match.group(2)), match.group(3)
        index = position - offset
        if not 0 <= index < len(sequence):
            raise DataError(
                f"{where}: mutant {part} is outside the sequence (position {position} with offset {offset} "
                f"is index {index}; the sequence has {len(sequence)} residues)"
            )
        if sequence[index] != wt:
            raise DataError(
                f"{where}: mutant {part} names wild type {wt} at position {position}, but the sequence has "
                f"{sequence[index]} there (index {index} with offset {offset}); check the sequence and the offset"
            )
        mutations.append(Mutation(index, wt, mt))
    if len({m.index for m in mutations}) < len(mutations):
        raise DataError(f"{where}: mutant {text!r} names one position twice")
    return mutations


def tokens_of(sequence: str) -> torch.Tensor:
    """<cls> residues <eos>, as fair-esm's batch converter encodes one sequence."""
    return torch.tensor([CLS_ID, *(VOCAB.index(a) for a in sequence), EOS_ID], dtype=torch.long)


def optimal_window(position: int, length: int, window: int) -> tuple[int, int]:
    """ProteinGym's get_optimal_window: the [start, end) token window around `position` (tokens incl. specials)."""
    half = window // 2
    if length <= window:
        return 0, length
    if position < half:
        return 0, window
    if position >= length - half:
        return length - window, length
    return max(0, position - half), min(length, position + half)


@torch.no_grad()
def log_probs(model: EsmForMaskedLM, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, vocab) fp32 log-softmax of equal-length rows; bf16 autocast on a GPU."""
    device = next(model.parameters()).device
    with autocast_for(device):
        logits = model(input_ids=tokens.to(device)).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def log_probs_at(model: EsmForMaskedLM, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, vocab) fp32 log-softmax at one token per row: the LM head runs on those B positions only."""
    device = next(model.parameters()).device
    with autocast_for(device):
        hidden = model.esm(input_ids=tokens.to(device)).last_hidden_state  # (B, T, hidden)
        picked = hidden[torch.arange(len(targets), device=device), targets.to(device)]  # (B, hidden)
        logits = model.lm_head(picked)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def masked_batches(
    rows: Iterable[tuple[Any, torch.Tensor, int]], window: int, toks_per_batch: int
) -> Iterator[tuple[list, torch.Tensor, torch.Tensor]]:
    """(keys, masked windows (B, W), target positions (B,)) for a stream of (key, tokens, token position) rows.

    Each site is masked in its ProteinGym optimal window; an odd window gives edge windows one token longer than
    middle ones, so rows wait in one buffer per window length and a batch holds one length. At most one batch
    per length is held: memory does not grow with the number of rows.
    """
    buffers: dict[int, list] = {}
    for key, tokens, position in rows:
        start, end = optimal_window(position, len(tokens), window)
        masked = tokens[start:end].clone()
        masked[position - start] = MASK_ID
        buffer = buffers.setdefault(end - start, [])
        buffer.append((key, masked, position - start))
        if len(buffer) >= max(1, toks_per_batch // (end - start)):
            yield stack(buffer)
            buffer.clear()
    for buffer in buffers.values():
        if buffer:
            yield stack(buffer)


def stack(buffer: list) -> tuple[list, torch.Tensor, torch.Tensor]:
    keys, windows, targets = zip(*buffer)
    return list(keys), torch.stack(windows), torch.tensor(targets)


def masked_site_log_probs(
    model: EsmForMaskedLM, tokens: torch.Tensor, positions: list[int], window: int, toks_per_batch: int
) -> dict[int, torch.Tensor]:
    """{token position: vocab log-probs there with that token masked, in its optimal window} for one sequence."""
    out = {}
    for keys, batch, targets in masked_batches(((p, tokens, p) for p in positions), window, toks_per_batch):
        out.update(zip(keys, log_probs_at(model, batch, targets)))
    return out


def overlapping_log_probs(model: EsmForMaskedLM, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """ProteinGym's overlapping wt-marginals for a sequence past the window: windows from both ends, stride
    window/2 - 1, sigmoid-ramped weights at their edges, a central one when the middle overlap is short;
    (T, vocab). Its constants (1024, 256, 128, 16, 511) are the ones here at window=1024."""
    length = len(tokens)
    ramp, middle, temperature, stride = window // 4, window // 8, window / 64, window // 2 - 1
    weights = torch.ones(window)
    for i in range(1, ramp + 1):
        weights[i] = 1 / (1 + math.exp(-(i - middle) / temperature))
    for i in range(window - 2 - ramp, window - 1):
        weights[i] = 1 / (1 + math.exp((i - (window - 2) + middle) / temperature))
    total, weight_sum = torch.zeros(length, len(VOCAB)), torch.zeros(length)

    def add(start: int) -> None:
        total[start : start + window] += log_probs(model, tokens[None, start : start + window])[0] * weights[:, None]
        weight_sum[start : start + window] += weights

    left, right = 0, length - window
    while True:
        add(left)
        add(right)
        if left + window - 1 > right:  # the last two overlap
            break
        left, right = left + stride, right - stride
    if (left + window - 1) - right + 1 < stride:
        add(int(length / 2) - window // 2)
    return total / weight_sum[:, None]


def site_log_probs(
    model: EsmForMaskedLM,
    sequence: str,
    sites: set[int],
    strategy: str,
    window: int,
    scoring_window: str,
    toks_per_batch: int,
) -> dict[int, torch.Tensor]:
    """{sequence index: vocab log-probs at that residue} for wt-marginals or masked-marginals."""
    tokens = tokens_of(sequence)
    positions = sorted(sites)
    if strategy == "masked-marginals":
        lp = masked_site_log_probs(model, tokens, [i + 1 for i in positions], window, toks_per_batch)
        return {i: lp[i + 1] for i in positions}
    if len(tokens) > window and scoring_window == "overlapping":
        lp = overlapping_log_probs(model, tokens, window)
        return {i: lp[i + 1] for i in positions}
    by_window: dict[tuple[int, int], list[int]] = {}  # unmasked: one pass per distinct window
    for i in positions:
        by_window.setdefault(optimal_window(i + 1, len(tokens), window), []).append(i)
    out = {}
    for (start, end), members in by_window.items():
        lp = log_probs(model, tokens[None, start:end])[0]
        out.update({i: lp[i + 1 - start].clone() for i in members})  # a copy: the (T, vocab) pass is freed
    return out


def mutated(sequence: str, mutations: list[Mutation]) -> str:
    residues = list(sequence)
    for m in mutations:
        residues[m.index] = m.mt
    return "".join(residues)


def pseudo_log_likelihood(
    model: EsmForMaskedLM,
    sequences: Iterable[str],
    count: int,
    window: int,
    toks_per_batch: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Sum over every residue of log p(residue | the sequence with it masked), per sequence (equal lengths).

    Reduced per batch: each (B, vocab) block is cut to the B target log-probs and added to its sequence's total,
    so memory holds one batch and `count` floats whatever the number of sequences.
    """
    totals = np.zeros(count)

    def rows() -> Iterator[tuple[tuple[int, int], torch.Tensor, int]]:
        for n, sequence in enumerate(sequences):
            tokens = tokens_of(sequence)
            for i in range(len(sequence)):
                yield (n, int(tokens[i + 1])), tokens, i + 1

    for keys, batch, targets in masked_batches(rows(), window, toks_per_batch):
        owners, residues = (torch.tensor(k) for k in zip(*keys))
        picked = log_probs_at(model, batch, targets).gather(1, residues[:, None])[:, 0].double().numpy()
        np.add.at(totals, owners.numpy(), picked)
        if progress:
            progress(len(keys))
    return totals


def sites_of(mutants: list[list[Mutation]]) -> list[int]:
    """The distinct sequence indices the mutants change, sorted: masked-marginals' unit of work."""
    return sorted({m.index for mutant in mutants for m in mutant})


def rank_part(
    model: EsmForMaskedLM,
    sequence: str,
    mutants: list[list[Mutation]],
    strategy: str,
    rank: int = 0,
    world: int = 1,
    window: int = 1024,
    scoring_window: str = "optimal",
    toks_per_batch: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One rank's share of a scan: masked-marginals splits the distinct sites (each is one pass), returning the
    (sites[rank::world], vocab) log-prob rows; the others split the mutants, returning mutants[rank::world]'s scores.
    `merge_parts` turns every rank's part into the whole scan's scores."""
    if strategy == "masked-marginals":
        mine = sites_of(mutants)[rank::world]
        lp = site_log_probs(model, sequence, set(mine), strategy, window, scoring_window, toks_per_batch)
        return np.stack([lp[i].double().numpy() for i in mine]) if mine else np.zeros((0, len(VOCAB)))
    share = mutants[rank::world]
    if strategy == "pseudo-ppl":
        sequences = (mutated(sequence, m) for m in share)
        return pseudo_log_likelihood(model, sequences, len(share), window, toks_per_batch, progress)
    lp = site_log_probs(model, sequence, set(sites_of(share)), strategy, window, scoring_window, toks_per_batch)
    return np.array([log_ratio(lp, mutant) for mutant in share])


def log_ratio(lp: dict[int, Any], mutant: list[Mutation]) -> float:
    """Sum over the mutant's sites of log p(mt) - log p(wt) (ProteinGym's label_row)."""
    return sum(float(lp[m.index][VOCAB.index(m.mt)] - lp[m.index][VOCAB.index(m.wt)]) for m in mutant)


def part_shape(mutants: list[list[Mutation]], strategy: str, rank: int, world: int) -> tuple[int, ...]:
    """The shape of `rank_part`'s answer on `rank`: what a gather pads to and trims back."""
    if strategy == "masked-marginals":
        return len(sites_of(mutants)[rank::world]), len(VOCAB)
    return (len(mutants[rank::world]),)


def merge_parts(mutants: list[list[Mutation]], strategy: str, parts: list[np.ndarray]) -> np.ndarray:
    """Every rank's `rank_part`, in rank order, into one score per mutant (equal to one process's)."""
    world = len(parts)
    if strategy == "masked-marginals":
        sites = sites_of(mutants)
        lp = {}
        for rank, part in enumerate(parts):
            lp.update(zip(sites[rank::world], part))
        return np.array([log_ratio(lp, mutant) for mutant in mutants])
    out = np.empty(len(mutants))
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out


def score_mutants(
    model: EsmForMaskedLM,
    sequence: str,
    mutants: list[list[Mutation]],
    strategy: str,
    window: int = 1024,
    scoring_window: str = "optimal",
    toks_per_batch: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One score per mutant: summed log-ratios (wt-/masked-marginals) or the mutant's pseudo-log-likelihood.

    `progress(n)` is called as n more masked copies are scored (pseudo-ppl, the long one)."""
    part = rank_part(model, sequence, mutants, strategy, 0, 1, window, scoring_window, toks_per_batch, progress)
    return merge_parts(mutants, strategy, [part])
