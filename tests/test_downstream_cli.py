# ruff: noqa: F811  (pytest fixtures imported from test_downstream are parameters here)
"""What a user of the inference tools sees: messages, progress, reruns (issue 30's small fixes)."""

import logging

from protein_mlm.inference import score
from protein_mlm.inference.commands import embed_main
from protein_mlm.inference.loading import load_model
from protein_mlm.inference.zero_shot import parse_mutant, score_mutants
from tests.test_downstream import WILD_TYPE, fair_esm, fasta, hf_dir, one_line_exit, run_embed  # noqa: F401


def test_a_missing_fasta_names_the_embed_argument(hf_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    line = one_line_exit(
        embed_main, monkeypatch, capsys, hf_dir, tmp_path / "no.fasta", tmp_path / "e", "--include", "mean"
    )
    assert "no.fasta does not exist; pass the FASTA file" in line and "data.train_path" not in line
    assert not (tmp_path / "e").exists()


def test_a_rerun_by_another_path_resumes_and_warns_only_about_what_it_writes(
    hf_dir,
    fasta,
    tmp_path,
    monkeypatch,
    caplog,
    capsys,  # noqa: F811
):
    monkeypatch.chdir(hf_dir.parent)
    args = [fasta, tmp_path / "e", "--include", "mean", "--truncation_seq_length", 25]
    with caplog.at_level(logging.WARNING):
        assert run_embed(hf_dir.name, *args) == 4  # relative
        assert caplog.text.count("longer than --truncation_seq_length") == 1
        caplog.clear()
        assert run_embed(hf_dir.resolve(), *args) == 0  # absolute: the same model, nothing to write
        assert "longer than" not in caplog.text
    printed = capsys.readouterr().out
    assert "\n\n" not in printed and not printed.startswith("\n")  # no bar residue outside a terminal


def test_pseudo_ppl_reports_progress_and_the_strategies_are_explained(hf_dir):  # noqa: F811
    mutants = [parse_mutant(m, WILD_TYPE, 1, "row") for m in ("K2A", "T3G:A4W")]
    seen = []
    score_mutants(load_model(hf_dir).model, WILD_TYPE, mutants, "pseudo-ppl", toks_per_batch=200, progress=seen.append)
    assert sum(seen) == 2 * len(WILD_TYPE) and len(seen) > 1  # one call per batch of masked copies
    text = score.create_parser().format_help()
    assert "one pass per mutated site" in text and "one pass per residue of every mutant" in text
