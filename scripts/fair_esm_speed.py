"""Ours against fair-esm's own loops on identical weights: embeddings (extract.py) and a masked-marginals scan
(predict.py), side by side in one process.

    .venv/bin/python scripts/fair_esm_speed.py --records 256 --length 300 --threads 2

fair-esm (a dev dependency) builds a seeded ESM-2 8M-shaped model (6 layers, width 320; every weight perturbed) and
`esm2_to_hf` gives ours the same weights. extract.py's loop: `FastaBatchedDataset.get_batch_indices(toks_per_batch,
extra_toks_per_seq=1)`, the alphabet's batch converter, `model(toks, repr_layers=[6])`, one `.pt` per record with its
mean representation. Ours: `protein-mlm-embed --include mean --repr_layers -1` (pt files) on the same FASTA.
predict.py's masked-marginals: one pass per token of the wild type with that token masked; ours: `score_mutants` on
every single substitution of that protein (19 per site). Rounds alternate (theirs, ours) and the best of each is
kept. Prints one JSON line: seconds per job and the ratios theirs / ours; the scores are checked to agree.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protein_mlm.inference import embed
from protein_mlm.inference.convert import esm2_to_hf
from protein_mlm.inference.zero_shot import Mutation, score_mutants

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def fair_esm_model():
    from esm.model.esm2 import ESM2

    torch.manual_seed(0)
    model = ESM2(num_layers=6, embed_dim=320, attention_heads=20, alphabet="ESM-1b").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def extract_py(model, fasta: Path, out: Path, toks_per_batch: int) -> None:
    """fair-esm scripts/extract.py's run() for --include mean --repr_layers 6 (the wheel ships no script)."""
    from esm import FastaBatchedDataset

    dataset = FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=model.alphabet.get_batch_converter(1022), batch_sampler=batches
    )
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for labels, strs, toks in loader:
            result = model(toks, repr_layers=[6], return_contacts=False)
            for i, label in enumerate(labels):
                n = min(1022, len(strs[i]))
                mean = {6: result["representations"][6][i, 1 : n + 1].mean(0).clone()}
                torch.save({"label": label, "mean_representations": mean}, out / f"{label}.pt")


def predict_py_masked_marginals(model, sequence: str) -> torch.Tensor:
    """fair-esm examples/variant-prediction/predict.py's masked-marginals: (tokens, vocab) log-probs."""
    _, _, tokens = model.alphabet.get_batch_converter()([("protein1", sequence)])
    rows = []
    with torch.no_grad():
        for i in range(tokens.size(1)):
            masked = tokens.clone()
            masked[0, i] = model.alphabet.mask_idx
            rows.append(torch.log_softmax(model(masked)["logits"], dim=-1)[:, i])
    return torch.cat(rows)


def best_of(rounds: int, jobs: dict) -> dict:
    """Alternate the jobs `rounds` times; the best wall time of each (the least disturbed by other load)."""
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256, help="FASTA records to embed")
    parser.add_argument("--length", type=int, default=300, help="residues of the scanned protein (and mean length)")
    parser.add_argument("--toks_per_batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    theirs = fair_esm_model()
    ours = esm2_to_hf(theirs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours.save_pretrained(tmp / "hf")
        from protein_mlm.alphabet import load_tokenizer

        load_tokenizer().save_pretrained(tmp / "hf")
        lengths = rng.integers(args.length // 2, args.length * 3 // 2, size=args.records)
        fasta = tmp / "in.fasta"
        fasta.write_text("".join(f">r{i}\n{''.join(rng.choice(list(AMINO), size=n))}\n" for i, n in enumerate(lengths)))
        sequence = "".join(rng.choice(list(AMINO), size=args.length))
        scan = [[Mutation(i, a, b)] for i, a in enumerate(sequence) for b in AMINO if b != a]
        counter = iter(range(10**6))

        def ours_embed():
            out = tmp / f"ours{next(counter)}"
            argv = [str(tmp / "hf"), str(fasta), str(out), "--include", "mean", "--repr_layers", "-1"]
            embed.run(embed.create_parser().parse_args([*argv, "--toks_per_batch", str(args.toks_per_batch)]))

        embed_times = best_of(
            args.rounds,
            {
                "extract.py": lambda: extract_py(theirs, fasta, tmp / f"theirs{next(counter)}", args.toks_per_batch),
                "ours": ours_embed,
            },
        )
        results = {}
        scan_times = best_of(
            args.rounds,
            {
                "predict.py": lambda: results.update(theirs=predict_py_masked_marginals(theirs, sequence)),
                "ours": lambda: results.update(ours=score_mutants(ours, sequence, scan, "masked-marginals")),
            },
        )
    lp, alphabet = results["theirs"], theirs.alphabet
    expected = [
        float(lp[m.index + 1, alphabet.get_idx(m.mt)] - lp[m.index + 1, alphabet.get_idx(m.wt)]) for (m,) in scan
    ]
    gap = float(np.abs(np.array(expected) - results["ours"]).max())
    print(
        json.dumps(
            {
                "torch_threads": args.threads,
                "records": args.records,
                "residues_embedded": int(lengths.sum()),
                "embed_seconds": {k: round(v, 2) for k, v in embed_times.items()},
                "embed_ratio": round(embed_times["extract.py"] / embed_times["ours"], 2),
                "scan_sites": args.length,
                "scan_mutants": len(scan),
                "scan_seconds": {k: round(v, 2) for k, v in scan_times.items()},
                "scan_ratio": round(scan_times["predict.py"] / scan_times["ours"], 2),
                "scan_max_abs_difference": gap,
            }
        )
    )


if __name__ == "__main__":
    main()
