"""Evaluate, export to Hugging Face, continue from an export: numbers, files and weights checked."""

import json
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from transformers import AutoTokenizer, EsmForMaskedLM

from protein_mlm.alphabet import encode_residues
from protein_mlm.data.masking import collate, mask_tokens, sample_rng
from protein_mlm.data.preprocess import BUNDLED_FASTA
from protein_mlm.errors import ConfigError
from protein_mlm.inference.evaluate import evaluate
from protein_mlm.model.checkpoints import export_hf, load_checkpoint, resolve_checkpoint
from protein_mlm.train import train
from protein_mlm.training.module import MaskedLMModule
from tests.conftest import CONFIG_DIR, ROOT, TINY, compose_config

SEQUENCES = (
    b">a\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>b\nMSIIGATRLQNDKSDTYSAGPCYAGGCSAFTPRGTCG\n>c\nMAFSAEDVLKEYDRRRRMEALLL\n"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny training run."""
    root = tmp_path_factory.mktemp("trained")
    cfg = compose_config(*TINY, "trainer.max_steps=4", "trainer.val_check_interval=4", f"paths.cache_dir={root}/cache")
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
    train(cfg)
    return root / "run"


def eval_cfg(tmp_path, ckpt, fasta):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", f"data.val_path={fasta}", "accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    return cfg


def test_eval_is_deterministic_and_writes_eval_json(run_dir, tmp_path):
    fasta = tmp_path / "x.fasta"
    fasta.write_bytes(SEQUENCES)
    first = evaluate(eval_cfg(tmp_path, run_dir, fasta))
    second = evaluate(eval_cfg(tmp_path, run_dir / "checkpoints" / "last.ckpt", fasta))
    assert first["loss"] == second["loss"] and first["accuracy"] == second["accuracy"]
    assert first["sequences"] == 3 and first["perplexity"] == pytest.approx(torch.tensor(first["loss"]).exp().item())
    assert 1 < first["unigram_perplexity"] < 20
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["loss"] == first["loss"]


def test_eval_of_an_hf_export_matches_its_checkpoint(run_dir, tmp_path):
    """eval.py reads models through the one loader: an export gives the checkpoint's numbers."""
    fasta = tmp_path / "x.fasta"
    fasta.write_bytes(SEQUENCES)
    from_checkpoint = evaluate(eval_cfg(tmp_path, run_dir, fasta))
    from_export = evaluate(eval_cfg(tmp_path, export_hf(run_dir, tmp_path / "hf"), fasta))
    assert from_export["loss"] == pytest.approx(from_checkpoint["loss"], abs=1e-6)
    assert from_export["accuracy"] == from_checkpoint["accuracy"] and from_export["checkpoint"] == str(tmp_path / "hf")


def test_export_round_trip_gives_identical_logits(run_dir, tmp_path, capsys):
    out = export_hf(run_dir, tmp_path / "hf")
    assert "(the run's best by val/loss)" in capsys.readouterr().out  # says which checkpoint it exported
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())  # readable by others, unlike 0600
    checkpoint = load_checkpoint(resolve_checkpoint(run_dir))
    module = MaskedLMModule(architecture=checkpoint["hyper_parameters"]["architecture"])
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    exported = EsmForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer("MKTAYI")["input_ids"] == [0, *encode_residues(b"MKTAYI").tolist(), 2]

    residues = [encode_residues(b"MKTAYIAKQRQISFVK"), encode_residues(b"MSIIGATR")]
    batch = collate([mask_tokens(r, sample_rng(0, 0, i)) for i, r in enumerate(residues)])
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"])
        theirs = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_init_from_an_export_loads_identical_weights(run_dir, tmp_path):
    out = export_hf(run_dir, tmp_path / "hf")
    exported = EsmForMaskedLM.from_pretrained(out, local_files_only=True)
    architecture = load_checkpoint(resolve_checkpoint(run_dir))["hyper_parameters"]["architecture"]
    module = MaskedLMModule(architecture=architecture, init_from=str(out))
    for (name, ours), (_, theirs) in zip(module.model.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(ours, theirs), name
    wrong = dict(architecture, hidden_size=64, intermediate_size=128)
    with pytest.raises(ConfigError, match="hidden_size: 32 there, 64 here"):
        MaskedLMModule(architecture=wrong, init_from=str(out))


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_checkpoint(tmp_path / "none.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        load_checkpoint(broken)


def test_eval_cli_missing_checkpoint_is_one_line(tmp_path):
    import subprocess

    cmd = [
        sys.executable,
        str(ROOT / "eval.py"),
        f"ckpt_path={tmp_path}/missing.ckpt",
        f"data.val_path={BUNDLED_FASTA}",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert not (tmp_path / "outputs").exists()  # a refused eval creates nothing


def test_eval_cli_writes_under_outputs_eval_and_names_the_checkpoint(run_dir, tmp_path):
    import subprocess

    fasta = tmp_path / "x.fasta"
    fasta.write_bytes(SEQUENCES)
    cmd = [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={run_dir}", f"data.val_path={fasta}", "accelerator=cpu"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(the run's best by val/loss)" in result.stdout
    (written,) = (tmp_path / "outputs" / "eval").glob("*/*/eval.json")  # outputs/eval/<date>/<time>/
    assert json.loads(written.read_text())["sequences"] == 3
