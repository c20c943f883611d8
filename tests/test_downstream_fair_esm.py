"""fair-esm .pt files read directly (ESM-2, ESM-1b, ESM-1v; with and without the contact-regression file), checked
against the model fair-esm's own `load_model_and_alphabet_local` builds from the same file."""

from argparse import Namespace

import pytest
import torch

from protein_mlm.errors import UserError
from protein_mlm.inference import score
from protein_mlm.inference.commands import embed_main, score_main
from protein_mlm.inference.loading import load_model
from tests.test_downstream import RECORDS, WILD_TYPE, fasta, one_line_exit, run_embed  # noqa: F401 (fixture)

esm = pytest.importorskip("esm")  # fair-esm==2.0.0, a dev dependency

SEQUENCES = [s for _, s in RECORDS]


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its initial value (LayerNorms, biases, contact head too)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def save_fair_esm(model: torch.nn.Module, path, settings: dict, regression: bool) -> None:
    """Write `model` as fair-esm's released files: fairseq's prefixes, the regression weights in their own file."""
    state = model.state_dict()
    heads = {k: state.pop(k) for k in ("contact_head.regression.weight", "contact_head.regression.bias")}
    weights = {
        (f"encoder.{k}" if k.startswith("lm_head") else f"encoder.sentence_encoder.{k}"): v for k, v in state.items()
    }
    torch.save({"model": weights, **settings}, path)
    if regression:
        torch.save({"model": heads}, path.with_name(f"{path.stem}-contact-regression.pt"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (path, fair-esm's model loaded from it by load_model_and_alphabet_local)}."""
    from esm.model.esm1 import ProteinBertModel
    from esm.model.esm2 import ESM2
    from esm.pretrained import load_model_and_alphabet_local

    root = tmp_path_factory.mktemp("fair_esm")
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    esm2 = perturbed(ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet=alphabet))
    cfg = {
        "cfg": {
            "model": Namespace(encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True)
        }
    }
    v1_args = dict(layers=2, embed_dim=32, ffn_embed_dim=48, attention_heads=4, max_positions=64, token_dropout=True)
    esm1b = perturbed(
        ProteinBertModel(Namespace(arch="roberta_large", emb_layer_norm_before=True, **v1_args), alphabet)
    )
    esm1v = perturbed(ProteinBertModel(Namespace(arch="roberta_large", **v1_args), alphabet))
    written = {
        "esm2": (esm2, "esm2_t2_tiny.pt", cfg, True),
        "esm2-no-regression": (esm2, "esm2_t2_bare.pt", cfg, False),
        "esm1b": (esm1b, "esm1b_t2_tiny.pt", {"args": Namespace(arch="roberta_large", **v1_args)}, True),
        "esm1v": (esm1v, "esm1v_t2_tiny_1.pt", {"args": Namespace(arch="roberta_large", **v1_args)}, False),
    }
    out = {}
    for kind, (model, name, settings, regression) in written.items():
        save_fair_esm(model, root / name, settings, regression)
        if kind == "esm2-no-regression":  # fair-esm requires the file for ESM-2 names: compare with the other
            out[kind] = (root / name, out["esm2"][1])
            continue
        with torch.serialization.safe_globals([Namespace]):
            loaded, _ = load_model_and_alphabet_local(root / name)
        out[kind] = (root / name, loaded.eval())
    return out


def tokens_of(sequences):
    return esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()([("p", s) for s in sequences])[2]


@pytest.mark.parametrize("kind", ["esm2", "esm2-no-regression", "esm1b", "esm1v"])
def test_logits_and_contacts_equal_fair_esm(files, kind):
    path, reference = files[kind]
    loaded = load_model(path, attn_implementation="eager")
    assert loaded.contact_head_trained == (kind in ("esm2", "esm1b"))
    tokens = tokens_of(SEQUENCES)  # padded to the longest: masks and padding as fair-esm batches them
    masked = tokens.clone()
    masked[:, 5] = esm.Alphabet.from_architecture("ESM-1b").mask_idx  # token dropout's rescale is exercised
    with torch.no_grad():
        for batch in (tokens, masked):
            theirs = reference(batch, return_contacts=True)
            ours = loaded.model(input_ids=batch, attention_mask=batch.ne(1), output_attentions=True)
            torch.testing.assert_close(ours.logits, theirs["logits"], rtol=0, atol=1e-4)
        if loaded.contact_head_trained:
            contacts = loaded.model.predict_contacts(tokens, attention_mask=tokens.ne(1))
            torch.testing.assert_close(contacts, reference(tokens, return_contacts=True)["contacts"], rtol=0, atol=1e-4)


def test_every_tool_reads_a_pt(files, fasta, tmp_path):  # noqa: F811
    """embed, score, eval and model.init_from take the .pt and give what fair-esm's model gives."""
    from protein_mlm.inference.evaluate import evaluate
    from protein_mlm.training.module import MaskedLMModule
    from tests.test_eval_export import eval_cfg

    path, reference = files["esm2"]
    run_embed(path, fasta, tmp_path / "emb", "--include", "mean", "--repr_layers", "-1")
    first = torch.load(tmp_path / "emb" / "seq1.pt", weights_only=True)["mean_representations"][2]
    with torch.no_grad():
        theirs = reference(tokens_of(SEQUENCES[:1]), repr_layers=[2])["representations"][2][0, 1:-1].mean(0)
    torch.testing.assert_close(first, theirs, rtol=0, atol=1e-4)
    scan = tmp_path / "dms.csv"
    scan.write_text("mutant,DMS_score\nK2A,0.1\nT3G,0.5\nA4W:Y5C,0.2\n")
    argv = ["--model-location", str(path), "--sequence", WILD_TYPE, "--dms-input", str(scan)]
    df = score.run(
        score.create_parser().parse_args([*argv, "--dms-output", str(tmp_path / "o.csv"), "--offset-idx", "1"])
    )
    alphabet = reference.alphabet
    with torch.no_grad():
        lp = torch.log_softmax(reference(tokens_of([WILD_TYPE]))["logits"], -1)[0]
    expected = float(lp[2, alphabet.get_idx("A")] - lp[2, alphabet.get_idx("K")])
    assert df[str(path)].iloc[0] == pytest.approx(expected, abs=1e-4)
    report = evaluate(eval_cfg(tmp_path, path, fasta))
    assert report["checkpoint"] == str(path) and report["sequences"] == len(RECORDS) and report["loss"] > 0
    module = MaskedLMModule(architecture=load_model(path).architecture, init_from=str(path))
    assert module.contact_head_trained
    torch.testing.assert_close(
        module.model.esm.embeddings.word_embeddings.weight, reference.embed_tokens.weight, rtol=0, atol=0
    )


def test_msa_transformer_and_unsafe_files_are_refused_in_one_line(tmp_path):
    msa = tmp_path / "esm_msa1b_t12_100M_UR50S.pt"
    torch.save({"model": {}, "args": Namespace(arch="msa_transformer")}, msa)
    with pytest.raises(UserError, match="MSA Transformer, which reads alignments"):
        load_model(msa)
    unsafe = tmp_path / "esm2_t6_odd.pt"
    torch.save({"model": {}, "cfg": {"model": torch.nn.Identity()}}, unsafe)  # an object that is not settings
    with pytest.raises(UserError, match=r"holds a torch\.nn\.modules\.linear\.Identity object\); only tensors") as e:
        load_model(unsafe)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name, hint",
    [
        ("facebook/esm2_t6_8M_UR50D", "huggingface-cli download facebook/esm2_t6_8M_UR50D --local-dir"),
        ("esm2_t33_650M_UR50D", "~/.cache/torch/hub/checkpoints/esm2_t33_650M_UR50D.pt"),
    ],
)
def test_hub_names_say_nothing_is_downloaded(name, hint, fasta, tmp_path, monkeypatch, capsys):  # noqa: F811
    line = one_line_exit(embed_main, monkeypatch, capsys, name, fasta, tmp_path / "emb", "--include", "mean")
    assert "nothing is downloaded" in line and hint in line
    (tmp_path / "dms.csv").write_text("mutant\nK2A\n")
    argv = ["--sequence", "MKT", "--dms-input", tmp_path / "dms.csv", "--dms-output", tmp_path / "o.csv"]
    line = one_line_exit(score_main, monkeypatch, capsys, "--model-location", name, *argv, "--offset-idx", 1)
    assert "nothing is downloaded" in line
