"""`python train.py` with bad input: one line naming the problem and the fix, exit 2, no traceback,
nothing written over an earlier run."""

import subprocess
import sys

import pytest

from protein_mlm import cli
from protein_mlm.cli import make_run_dir
from protein_mlm.preflight import check_config
from protein_mlm.train import train
from tests.conftest import CONFIG_DIR, TINY, compose_config, run_cli

QUICK = [o for o in TINY if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=2"]


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last, last


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["model=esm2_9m"], ["esm2_9m", "esm2_8m"]),  # unknown option: names it and lists the real ones
        (["trainer.no_such_key=1"], ["no_such_key"]),
        (["optimizer.lr=0"], ["optimizer.lr=0", "> 0"]),
        (["optimizer.lr=-1e-4"], ["optimizer.lr"]),
        (["trainer.max_steps=0"], ["trainer.max_steps=0", "> 0"]),
        (["scheduler.warmup_steps=-5"], ["warmup_steps=-5", ">= 0"]),
        (["optimizer.lr=abc"], ["optimizer.lr='abc' is not a float", "e.g. optimizer.lr=4e-4"]),
        (["trainer.max_steps=abc"], ["trainer.max_steps='abc' is not an int"]),
        (["scheduler.warmup_steps=abc"], ["scheduler.warmup_steps='abc' is not an int"]),
        (["data.max_tokens=10"], ["data.max_tokens=10 is below data.max_length=1024"]),
        (["data.max_tokens=abc"], ["data.max_tokens='abc' is not an int or null"]),
        (["data.val_fraction=0"], ["data.val_fraction=0 leaves no validation set"]),
        (["trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches=0 must be >= 1"]),
        (["seed=-1"], ["seed=-1 must be >= 0"]),
        (["model=esm1b", "data.max_length=2048"], ["data.max_length=2048", "learned positions cover (1024 tokens)"]),
        (["data.mask_prob=1.5"], ["data.mask_prob=1.5 must be in (0, 1)"]),
        (["data.val_max_sequences=0"], ["data.val_max_sequences=0 must be >= 1 or null"]),
        (
            ["scheduler.warmup_step=10"],
            ["scheduler.warmup_step is not a config key; did you mean scheduler.warmup_steps?"],
        ),
        (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], ["trainer.precision=16-mixed needs a GPU"]),
        (["data.train_path=."], ["data.train_path=. is a directory"]),
        (["ckpt_path=."], ["ckpt_path=. is a directory", "resume=<run dir>"]),
        (["data.train_path=missing.fasta"], ["missing.fasta", "does not exist"]),
        (["ckpt_path=nope.ckpt"], ["nope.ckpt", "does not exist"]),
        (["scheduler=linear", "scheduler.warmup_steps=50", "trainer.max_steps=10"], ["warmup_steps=50"]),
        (["data.train_path=headers_only.fasta"], ["headers_only.fasta holds no sequence"]),
        (["optimizer.betas=[0.9]"], ["optimizer.betas=[0.9] must be two numbers in [0, 1)"]),
        (["optimizer.betas=0.9"], ["optimizer.betas=0.9 is not a list", "optimizer.betas=[0.9,0.98]"]),
        (["optimizer.betas=[0.9,abc]"], ["optimizer.betas=[0.9, 'abc'] must be two numbers"]),
        (["optimizer.weight_decay=-0.1"], ["optimizer.weight_decay=-0.1 must be >= 0"]),
        (["optimizer=sgd", "optimizer.momentum=1.5"], ["optimizer.momentum=1.5 must be in [0, 1)"]),
        (["scheduler=linear", "scheduler.final_lr_ratio=2"], ["scheduler.final_lr_ratio=2 must be in [0, 1]"]),
        (["trainer=ddp", "trainer.num_nodes=0"], ["trainer.num_nodes=0 must be >= 1"]),
        (["trainer.accelerator=cpu", "trainer.devices=64"], ["trainer.devices=64 asks for 64 processes"]),
        (["trainer.devices=two"], ["trainer.devices='two' is not a device count"]),
        (["data.shuffle_buffer=0"], ["data.shuffle_buffer=0 must be >= 1"]),
    ],
)
def test_bad_config_is_rejected_before_anything_runs(tmp_path, monkeypatch, capsys, overrides, fragments):
    (tmp_path / "headers_only.fasta").write_text(">a\n>b description\n\n>c\n")  # records without residues
    earlier = tmp_path / "outputs" / "2020-01-01" / "00-00-00"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    result = run_in_process(monkeypatch, capsys, tmp_path, *overrides)
    assert_user_error(result, *fragments)
    # Rejected before a run dir was made; the earlier run is byte-identical.
    assert [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()] == [earlier / "checkpoints" / "last.ckpt"]
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's checkpoint"


def run_in_process(monkeypatch, capsys, cwd, *args: str) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in this process, for input the CLI refuses before Hydra starts (no start-up cost);
    `test_a_bad_value_is_refused_by_the_real_entry_point` covers the same path through a fresh process."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.run("train", train, check_config)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, out.out, out.err)


def test_a_bad_value_is_refused_by_the_real_entry_point(tmp_path):
    assert_user_error(run_cli("optimizer.lr=0", cwd=tmp_path), "optimizer.lr=0", "> 0")
    assert not (tmp_path / "outputs").exists()


def test_run_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli(f"hydra.run.dir={tmp_path}/afile/run", cwd=tmp_path)
    assert_user_error(result, "cannot create the run dir", "hydra.run.dir")


def test_existing_run_dir_is_never_overwritten(tmp_path):
    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_text("precious")
    result = run_cli(f"hydra.run.dir={old}", cwd=tmp_path)
    assert_user_error(result, "already holds files")
    assert (old / "checkpoints" / "last.ckpt").read_text() == "precious"
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b">a\nMKTAYIAKQR\n>b\nMK1T\n", ["bad.fasta:4:3", "invalid residue character '1'"]),
        (b"", ["is empty"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["binary"]),
        (b"just some text\n", ["before the first '>'"]),
    ],
)
def test_bad_data_file_is_one_line(tmp_path, content, fragments):
    (tmp_path / "bad.fasta").write_bytes(content)
    result = run_cli(*QUICK, "data.train_path=bad.fasta", f"paths.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert_user_error(result, *fragments)


def test_default_run_dirs_never_collide(tmp_path):
    first = make_run_dir(str(tmp_path / "15-00-00"), explicit=False)
    second = make_run_dir(str(tmp_path / "15-00-00"), explicit=False)
    assert (first, second) == (str(tmp_path / "15-00-00"), str(tmp_path / "15-00-00-1"))


def test_a_good_run_ends_with_a_summary_line(tmp_path):
    result = run_cli(*QUICK, f"paths.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("Done: ")]
    assert len(summary) == 1
    assert "val/perplexity" in summary[0] and "unigram perplexity" in summary[0]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1 and f"tensorboard --logdir {run_dirs[0]}" in summary[0]
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dirs[0]).glob("events.out.tfevents.*"))


def test_divergence_ends_a_single_run_with_one_line(tmp_path):
    result = run_cli(*QUICK, "faults.inject_nan_at_step=1", f"paths.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert_user_error(result, "training diverged at step 1", "loss is nan")


def test_a_typo_in_a_sweep_fails_once_in_one_line(tmp_path):
    result = run_cli("-m", "scheduler.warmup_steps=10,20", "optimizer.lrr=1e-3", cwd=tmp_path)
    assert_user_error(result, "optimizer.lrr")
    assert not (tmp_path / "multirun").exists()


def test_resume_of_a_run_dir_without_its_config_is_refused(tmp_path):
    """A resume restores the run's config.yaml; a dir without one (its record lost) is refused, nothing written."""
    run_dir = tmp_path / "old_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- model=tiny\n")
    result = run_cli(f"resume={run_dir}", cwd=tmp_path)
    assert_user_error(result, "is not a run dir with checkpoints/last.ckpt and config.yaml")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints"]  # nothing written


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    import torch

    (tmp_path / "bad.ckpt").write_bytes(b"\x80\x02 not a checkpoint")
    assert_user_error(run_cli("model=tiny", "ckpt_path=bad.ckpt", cwd=tmp_path), "cannot load checkpoint bad.ckpt")
    architecture = dict(compose_config("model=tiny").model.architecture, hidden_size=64)
    checkpoint = {"state_dict": {}, "hyper_parameters": {"architecture": architecture}}
    torch.save(checkpoint, tmp_path / "old.ckpt")  # no format key: written before the resumable data loader
    result = run_cli("model=tiny", "ckpt_path=old.ckpt", cwd=tmp_path)
    assert_user_error(result, "written by an older protein-mlm (format 1)", "model.init_from=")
    torch.save({**checkpoint, "protein_mlm_format": 2}, tmp_path / "other.ckpt")
    result = run_cli("model=tiny", "ckpt_path=other.ckpt", cwd=tmp_path)
    assert_user_error(result, "holds another model", "hidden_size: 64 in the checkpoint, 32 requested")
    assert_user_error(run_cli(f"resume={tmp_path}", cwd=tmp_path), "is not a run dir with checkpoints/last.ckpt")
    assert not (tmp_path / "outputs").exists()


def test_help_shows_examples_and_every_user_facing_option(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "Examples:" in result.stdout and "model_base" not in result.stdout
    groups = {
        line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.startswith("  ") and line[2] != " "
    }
    for group in ("model", "optimizer", "scheduler", "trainer", "data", "logger", "experiment", "debug", "callbacks"):
        options = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
        listed = set(groups[group].split(None, 1)[1].replace(",", " ").replace("(", " ").split())
        assert options <= listed, f"{group}: {options - listed} missing from --help"


@pytest.mark.slow
def test_a_refused_resume_or_eval_changes_nothing_in_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer.max_steps")]
    result = run_cli(*tiny, "trainer.max_steps=2", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    result = run_cli(f"resume={run_dir}", "optimizer.no_decay_bias_and_norm=true", cwd=tmp_path)
    assert_user_error(result, "optimizer.no_decay_bias_and_norm=true differs from the run's", "may not change")
    headers_only = tmp_path / "headers.fasta"
    headers_only.write_text(">a\n>b\n")
    import subprocess
    import sys

    from tests.conftest import ROOT

    command = [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={run_dir}", f"data.val_path={headers_only}"]
    assert_user_error(subprocess.run(command, cwd=tmp_path, capture_output=True, text=True), "holds no sequence")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "outputs").exists()
