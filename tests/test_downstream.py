"""Embeddings and zero-shot scores against fair-esm 2.0.0: the same weights give the same numbers and files."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import open_dict

from protein_mlm.alphabet import load_tokenizer
from protein_mlm.inference import embed, score
from protein_mlm.inference.commands import embed_main, score_main
from protein_mlm.inference.convert import esm2_to_hf
from protein_mlm.inference.loading import load_model
from protein_mlm.inference.zero_shot import optimal_window
from protein_mlm.model.checkpoints import CONTACT_HEAD_KEY, export_hf, load_checkpoint
from protein_mlm.train import train
from tests.conftest import TINY, compose_config

esm = pytest.importorskip("esm")  # fair-esm==2.0.0, a dev dependency
from esm.model.esm2 import ESM2  # noqa: E402

RECORDS = [
    ("seq1 first protein, with a description", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"),
    ("seq2", "MSIIGATRLQNDKSDTYSAGPCYAGGCSAFTPRGTCG"),
    ("seq3 short", "MAFSAEDVLKEYDRRRRMEALLL"),
    ("seq4", "GSHMLEDPVAGRWWQPELTKRYVDLRNE"),
]
WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQKQ"
OFFSET = 3  # the first residue is number 3


@pytest.fixture(scope="module")
def fair_esm():
    """A small fair-esm ESM-2 with every weight moved off its initial value (LayerNorms, contact head too)."""
    torch.manual_seed(0)
    model = ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet="ESM-1b").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(fair_esm, tmp_path_factory):
    """The same weights as a Hugging Face ESM directory, as a downloaded facebook/esm2_* one (no project marker)."""
    out = tmp_path_factory.mktemp("hf")
    esm2_to_hf(fair_esm).save_pretrained(out)
    load_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def project_run(tmp_path_factory):
    """A tiny run this project trained: its contact head is the frozen, untrained one."""
    root = tmp_path_factory.mktemp("trained")
    cfg = compose_config(*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", f"paths.cache_dir={root}/cache")
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
    train(cfg)
    return root / "run"


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">{header}\n{seq[:20]}\n{seq[20:]}\n" for header, seq in RECORDS))
    return path


def fair_esm_extract(model, records, layers, truncation=1022):
    """extract.py's run(), on one batch: {label: result dict}."""
    alphabet = model.alphabet
    _, strs, toks = alphabet.get_batch_converter(truncation)([(h, s) for h, s in records])
    with torch.no_grad():
        out = model(toks, repr_layers=layers, return_contacts=True)
    results = {}
    for i, (label, _) in enumerate(records):
        n = min(truncation, len(strs[i]))
        reps = out["representations"]
        results[label] = {
            "label": label,
            "representations": {layer: t[i, 1 : n + 1] for layer, t in reps.items()},
            "mean_representations": {layer: t[i, 1 : n + 1].mean(0) for layer, t in reps.items()},
            "bos_representations": {layer: t[i, 0] for layer, t in reps.items()},
            "contacts": out["contacts"][i, :n, :n],
        }
    return results


def run_embed(*argv):
    return embed.run(embed.create_parser().parse_args([str(a) for a in argv]))


def one_line_exit(main, monkeypatch, capsys, *argv) -> str:
    """Run a console entry point; it must exit 2 with one line on stderr (no traceback); return the line."""
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_pt_files_equal_fair_esm_extract(fair_esm, hf_dir, fasta, tmp_path):
    out = tmp_path / "emb"
    run_embed(
        hf_dir,
        fasta,
        out,
        "--repr_layers",
        0,
        1,
        -1,
        "--include",
        "mean",
        "per_tok",
        "bos",
        "contacts",
        "--toks_per_batch",
        80,
    )  # several batches, padded within each
    reference = fair_esm_extract(fair_esm, RECORDS, [0, 1, 2])
    for header, seq in RECORDS:
        ours = torch.load(out / f"{header.split()[0]}.pt")  # named by the record id, label = whole header
        theirs = reference[header]
        assert set(ours) == {"label", "representations", "mean_representations", "bos_representations", "contacts"}
        assert ours["label"] == header
        for kind in ("representations", "mean_representations", "bos_representations"):
            assert sorted(ours[kind]) == [0, 1, 2]  # -1 is stored as num_layers
            for layer in (0, 1, 2):
                torch.testing.assert_close(ours[kind][layer], theirs[kind][layer], rtol=0, atol=1e-4)
        assert ours["representations"][2].shape == (len(seq), 32) and ours["mean_representations"][0].shape == (32,)
        assert ours["contacts"].shape == (len(seq), len(seq))
        torch.testing.assert_close(ours["contacts"], theirs["contacts"], rtol=0, atol=1e-5)


def test_logits_equal_fair_esm_with_padding_and_masks(fair_esm, hf_dir):
    loaded = load_model(hf_dir)
    assert loaded.contact_head_trained  # an ESM directory without the project's marker: ESM's own, fitted head
    _, _, toks = fair_esm.alphabet.get_batch_converter()([(h, s) for h, s in RECORDS])
    toks[0, 5] = toks[2, 3] = fair_esm.mask_idx  # token dropout's rescale with masks present
    with torch.no_grad():
        theirs = fair_esm(toks)["logits"]
        ours = loaded.model(input_ids=toks, attention_mask=toks.ne(fair_esm.padding_idx).long()).logits
    keep = toks.ne(fair_esm.padding_idx)
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-4)


def test_truncation_warns_and_cuts_like_extract(fair_esm, hf_dir, fasta, tmp_path, caplog):
    run_embed(hf_dir, fasta, tmp_path / "e", "--include", "per_tok", "mean", "--truncation_seq_length", 25)
    assert "3 sequences are longer than --truncation_seq_length=25" in caplog.text
    reference = fair_esm_extract(fair_esm, RECORDS, [2], truncation=25)
    ours = torch.load(tmp_path / "e" / "seq2.pt")
    assert ours["representations"][2].shape == (25, 32)
    torch.testing.assert_close(
        ours["mean_representations"][2], reference["seq2"]["mean_representations"][2], rtol=0, atol=1e-4
    )


def test_npy_round_trips_and_reruns_skip_what_is_written(hf_dir, fasta, tmp_path, capsys):
    pt, npy = tmp_path / "pt", tmp_path / "npy"
    args = ["--repr_layers", 0, -1, "--include", "mean", "per_tok", "bos", "contacts", "--toks_per_batch", 80]
    run_embed(hf_dir, fasta, pt, *args)
    assert run_embed(hf_dir, fasta, npy, *args, "--format", "npy") == len(RECORDS)
    ids = pd.read_csv(npy / "records.tsv", sep="\t")
    assert ids["id"].tolist() == [h.split()[0] for h, _ in RECORDS] and ids["label"][0] == RECORDS[0][0]
    offsets, pair_offsets = np.load(npy / "per_tok_offsets.npy"), np.load(npy / "contacts_offsets.npy")
    per_tok, mean = np.load(npy / "per_tok_layer2.npy", mmap_mode="r"), np.load(npy / "mean_layer0.npy")
    bos, contacts = np.load(npy / "bos_layer2.npy"), np.load(npy / "contacts.npy")
    for i, (header, seq) in enumerate(RECORDS):
        ref = torch.load(pt / f"{header.split()[0]}.pt")
        np.testing.assert_array_equal(per_tok[offsets[i] : offsets[i + 1]], ref["representations"][2].numpy())
        np.testing.assert_array_equal(mean[i], ref["mean_representations"][0].numpy())
        np.testing.assert_array_equal(bos[i], ref["bos_representations"][2].numpy())
        pair = contacts[pair_offsets[i] : pair_offsets[i + 1]].reshape(len(seq), len(seq))
        np.testing.assert_array_equal(pair, ref["contacts"].numpy())

    assert run_embed(hf_dir, fasta, npy, *args, "--format", "npy") == 0  # all done: nothing recomputed
    done = np.load(npy / "done.npy", mmap_mode="r+")  # as if killed before records 1 and 3 were written
    done[[1, 3]] = False
    done.flush()
    mean_mm = np.load(npy / "mean_layer0.npy", mmap_mode="r+")
    mean_mm[[1, 3]] = 0
    mean_mm.flush()
    del done, mean_mm
    assert run_embed(hf_dir, fasta, npy, *args, "--format", "npy") == 2
    np.testing.assert_array_equal(np.load(npy / "mean_layer0.npy"), mean)
    (pt / "seq3.pt").unlink()
    assert run_embed(hf_dir, fasta, pt, *args) == 1
    with pytest.raises(Exception, match="other settings"):  # skipping into an extraction of other layers would mix
        run_embed(hf_dir, fasta, npy, "--repr_layers", 1, "--include", "mean", "--format", "npy")


def test_fp16_npy(hf_dir, fasta, tmp_path):
    run_embed(hf_dir, fasta, tmp_path / "h", "--include", "mean", "per_tok", "--format", "npy", "--fp16")
    assert np.load(tmp_path / "h" / "per_tok_layer2.npy", mmap_mode="r").dtype == np.float16


def test_any_model_location_loads_the_same_weights(project_run, tmp_path):
    export = export_hf(project_run, tmp_path / "hf")
    ckpt = next((project_run / "checkpoints").glob("best-*.ckpt"))
    tokens = torch.tensor([[0, 5, 6, 7, 8, 2]])
    logits = []
    assert load_checkpoint(ckpt)[CONTACT_HEAD_KEY] is False  # recorded, not defaulted
    assert json.loads((export / "config.json").read_text())[CONTACT_HEAD_KEY] is False
    for location in (project_run, ckpt, export):
        loaded = load_model(location)
        assert not loaded.contact_head_trained  # pretrained here: the head was frozen at its initialisation
        with torch.no_grad():
            logits.append(loaded.model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    torch.testing.assert_close(logits[0], logits[2], rtol=0, atol=1e-6)


def test_continued_pretraining_keeps_the_provenance_of_the_contact_head(hf_dir, project_run, tmp_path):
    """init_from=<ESM-2 dir> brings a fitted head (its checkpoints say so); init_from=<our export> does not."""
    from protein_mlm.training.module import MaskedLMModule

    architecture = load_model(hf_dir).architecture
    assert MaskedLMModule(architecture=architecture, init_from=str(hf_dir)).contact_head_trained
    export = export_hf(project_run, tmp_path / "hf")
    ours = load_model(export).architecture
    assert not MaskedLMModule(architecture=ours, init_from=str(export)).contact_head_trained
    assert not MaskedLMModule(architecture=ours).contact_head_trained


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("duplicate", "appears twice"),
        ("empty", "is empty"),
        ("layer", "--repr_layers 5: this model has layers 0..2"),
        ("contacts", "contact head of"),
    ],
)
def test_embed_bad_inputs_are_one_line_and_leave_nothing(
    case, message, hf_dir, project_run, fasta, tmp_path, monkeypatch, capsys
):
    model, include, layers = hf_dir, ["mean"], ["-1"]
    if case == "duplicate":
        fasta.write_text(">a x\nMKT\n>b\nMKV\n>a y\nMKW\n")
    if case == "empty":
        fasta.write_text("")
    if case == "layer":
        layers = ["5"]
    if case == "contacts":
        model, include = project_run, ["contacts"]
    out = tmp_path / "never"
    line = one_line_exit(
        embed_main, monkeypatch, capsys, model, fasta, out, "--include", *include, "--repr_layers", *layers
    )
    assert message in line
    assert not out.exists()


def dms_frame() -> pd.DataFrame:
    """24 mutants, numbered from OFFSET: singles over the whole protein, doubles and a triple."""
    rng = np.random.default_rng(0)
    amino = "ACDEFGHIKLMNPQRSTVWY"
    singles = [f"{WILD_TYPE[i]}{i + OFFSET}{amino[(i * 7) % 20]}" for i in range(0, len(WILD_TYPE), 2)]
    singles = [m for m in singles if m[0] != m[-1]]
    multi = [f"{singles[0]}:{singles[5]}", f"{singles[3]}:{singles[9]}", f"{singles[1]}:{singles[4]}:{singles[12]}"]
    mutants = singles + multi
    return pd.DataFrame({"mutant": mutants, "DMS_score": rng.normal(size=len(mutants)), "note": "x"})


def predict_py_label_row(row, sequence, token_probs, alphabet, offset_idx):
    """ProteinGym's label_row (predict.py's, summed over the sites of a multi-mutant)."""
    score = 0
    for mutation in row.split(":"):
        wt, idx, mt = mutation[0], int(mutation[1:-1]) - offset_idx, mutation[-1]
        assert sequence[idx] == wt, "The listed wildtype does not match the provided sequence"
        wt_encoded, mt_encoded = alphabet.get_idx(wt), alphabet.get_idx(mt)
        score += (token_probs[0, 1 + idx, mt_encoded] - token_probs[0, 1 + idx, wt_encoded]).item()
    return score


def reference_scores(model, sequence, mutants, strategy, offset, model_window=1024):
    """predict.py's / ProteinGym's scoring loops, run on the fair-esm model (`.cuda()` dropped)."""
    alphabet = model.alphabet
    _, _, batch_tokens = alphabet.get_batch_converter()([("protein1", sequence)])
    with torch.no_grad():
        if strategy == "wt-marginals":
            token_probs = torch.log_softmax(model(batch_tokens)["logits"], dim=-1)
        elif strategy == "masked-marginals":
            all_token_probs = []
            for i in range(batch_tokens.size(1)):
                batch_tokens_masked = batch_tokens.clone()
                batch_tokens_masked[0, i] = alphabet.mask_idx
                if batch_tokens.size(1) > model_window:
                    start, end = optimal_window(i, len(sequence) + 2, model_window)  # ProteinGym's get_optimal_window
                    batch_tokens_masked = batch_tokens_masked[:, start:end]
                else:
                    start = 0
                token_probs = torch.log_softmax(model(batch_tokens_masked)["logits"], dim=-1)
                all_token_probs.append(token_probs[:, i - start])
            token_probs = torch.cat(all_token_probs, dim=0).unsqueeze(0)
        else:  # pseudo-ppl, corrected: every residue i of the mutant sequence, read at token i + 1
            scores = []
            for mutant in mutants:
                seq = list(sequence)
                for mutation in mutant.split(":"):
                    seq[int(mutation[1:-1]) - offset] = mutation[-1]
                tokens = alphabet.get_batch_converter()([("p", "".join(seq))])[2]
                total = 0.0
                for i in range(1, len(seq) + 1):
                    masked = tokens.clone()
                    masked[0, i] = alphabet.mask_idx
                    lp = torch.log_softmax(model(masked)["logits"], dim=-1)
                    total += lp[0, i, alphabet.get_idx(seq[i - 1])].item()
                scores.append(total)
            return np.array(scores)
    return np.array([predict_py_label_row(m, sequence, token_probs, alphabet, offset) for m in mutants])


@pytest.mark.parametrize(
    "strategy", ["wt-marginals", "masked-marginals", pytest.param("pseudo-ppl", marks=pytest.mark.slow)]
)
def test_scores_equal_predict_py_on_fair_esm(strategy, fair_esm, hf_dir, tmp_path, capsys):
    df = dms_frame()
    assert len(df) >= 20
    df.to_csv(tmp_path / "dms.csv", index=False)
    args = [
        "--model-location",
        str(hf_dir),
        "--sequence",
        WILD_TYPE,
        "--dms-input",
        str(tmp_path / "dms.csv"),
        "--dms-output",
        str(tmp_path / "out.csv"),
        "--offset-idx",
        str(OFFSET),
        "--scoring-strategy",
        strategy,
    ]
    score.run(score.create_parser().parse_args(args))
    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["mutant", "DMS_score", "note", str(hf_dir)]  # input columns + one per model
    expected = reference_scores(fair_esm, WILD_TYPE, df["mutant"].tolist(), strategy, OFFSET)
    np.testing.assert_allclose(out[str(hf_dir)].to_numpy(), expected, rtol=0, atol=1e-4)
    printed = capsys.readouterr().out
    assert "Spearman rho" in printed and f"(n={len(df)})" in printed


def test_long_protein_windows_equal_proteingym(fair_esm, hf_dir):
    """Masked-marginals in ProteinGym's optimal window (a 12-token window on a 35-residue protein here)."""
    from protein_mlm.inference.zero_shot import parse_mutant, score_mutants

    df = dms_frame()
    loaded = load_model(hf_dir)
    mutants = [parse_mutant(m, WILD_TYPE, OFFSET, "row") for m in df["mutant"]]
    ours = score_mutants(loaded.model, WILD_TYPE, mutants, "masked-marginals", window=12)
    expected = reference_scores(fair_esm, WILD_TYPE, df["mutant"].tolist(), "masked-marginals", OFFSET, 12)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def proteingym_overlapping(model, batch_tokens):
    """ProteinGym compute_fitness.py's overlapping wt-marginals, verbatim but for `.cuda()`."""
    batch_size, seq_len = batch_tokens.shape
    token_probs = torch.zeros((batch_size, seq_len, 33))
    token_weights = torch.zeros((batch_size, seq_len))
    weights = torch.ones(1024)
    for i in range(1, 257):
        weights[i] = 1 / (1 + math.exp(-(i - 128) / 16))
    for i in range(1022 - 256, 1023):
        weights[i] = 1 / (1 + math.exp((i - 1022 + 128) / 16))
    start_left_window, end_left_window = 0, 1023
    start_right_window = (batch_tokens.size(1) - 1) - 1024 + 1
    end_right_window = batch_tokens.size(1) - 1
    while True:
        left = torch.log_softmax(model(batch_tokens[:, start_left_window : end_left_window + 1])["logits"], dim=-1)
        token_probs[:, start_left_window : end_left_window + 1] += left * weights.view(-1, 1)
        token_weights[:, start_left_window : end_left_window + 1] += weights
        right = torch.log_softmax(model(batch_tokens[:, start_right_window : end_right_window + 1])["logits"], dim=-1)
        token_probs[:, start_right_window : end_right_window + 1] += right * weights.view(-1, 1)
        token_weights[:, start_right_window : end_right_window + 1] += weights
        if end_left_window > start_right_window:
            break
        start_left_window += 511
        end_left_window += 511
        start_right_window -= 511
        end_right_window -= 511
    final_overlap = end_left_window - start_right_window + 1
    if final_overlap < 511:
        start_central_window = int(seq_len / 2) - 512
        end_central_window = start_central_window + 1023
        central = torch.log_softmax(model(batch_tokens[:, start_central_window : end_central_window + 1])["logits"], -1)
        token_probs[:, start_central_window : end_central_window + 1] += central * weights.view(-1, 1)
        token_weights[:, start_central_window : end_central_window + 1] += weights
    return token_probs / token_weights.view(-1, 1)


def test_overlapping_windows_equal_proteingym(fair_esm, hf_dir):
    from protein_mlm.inference.zero_shot import parse_mutant, score_mutants

    rng = np.random.default_rng(1)
    sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=2100))
    names = [f"{sequence[i]}{i + 1}{'A' if sequence[i] != 'A' else 'G'}" for i in (0, 700, 1050, 1500, 2099)]
    names.append(f"{names[1]}:{names[3]}")
    loaded = load_model(hf_dir)
    ours = score_mutants(
        loaded.model,
        sequence,
        [parse_mutant(m, sequence, 1, "row") for m in names],
        "wt-marginals",
        scoring_window="overlapping",
    )
    tokens = fair_esm.alphabet.get_batch_converter()([("p", sequence)])[2]
    with torch.no_grad():
        token_probs = proteingym_overlapping(fair_esm, tokens)
    expected = [predict_py_label_row(m, sequence, token_probs, fair_esm.alphabet, 1) for m in names]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wild_type", "row 2 (line 3): mutant K5A names wild type K at position 5, but the sequence has"),
        ("malformed", "row 1 (line 2): malformed mutant 'M3'"),
        ("column", "has no column 'mutant'"),
    ],
)
def test_score_bad_inputs_are_one_line_and_leave_no_file(case, message, hf_dir, tmp_path, monkeypatch, capsys):
    rows = {"wild_type": "mutant\nM3A\nK5A\n", "malformed": "mutant\nM3\n", "column": "variant\nM3A\n"}[case]
    (tmp_path / "dms.csv").write_text(rows)
    out = tmp_path / "out.csv"
    line = one_line_exit(
        score_main,
        monkeypatch,
        capsys,
        "--model-location",
        hf_dir,
        "--sequence",
        WILD_TYPE,
        "--dms-input",
        tmp_path / "dms.csv",
        "--dms-output",
        out,
        "--offset-idx",
        OFFSET,
    )
    assert message in line
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))


@pytest.mark.slow
def test_root_scripts_run_on_a_project_run_dir(project_run, hf_dir, fasta, tmp_path):
    """`python embed.py` / `python score.py` as a user runs them, on what training left behind."""
    import subprocess

    from tests.conftest import ROOT

    embed_cmd = [sys.executable, str(ROOT / "embed.py"), str(project_run), str(fasta), str(tmp_path / "e")]
    result = subprocess.run([*embed_cmd, "--include", "mean", "bos"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(tmp_path / "e" / "seq1.pt")["mean_representations"][2].shape == (32,)  # tiny: 2 layers, 32
    dms = tmp_path / "dms.csv"
    dms_frame().to_csv(dms, index=False)
    models = [str(project_run), str(hf_dir)]  # one score column per model, named as given
    score_cmd = [sys.executable, str(ROOT / "score.py"), "--model-location", *models, "--sequence", WILD_TYPE]
    score_cmd += ["--dms-input", str(dms), "--dms-output", str(tmp_path / "o.csv"), "--offset-idx", str(OFFSET)]
    result = subprocess.run(score_cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Spearman rho") == 2
    scored = pd.read_csv(tmp_path / "o.csv")
    assert list(scored.columns) == ["mutant", "DMS_score", "note", *models] and scored[models].notna().all().all()
