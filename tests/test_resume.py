"""`resume=` continues the run that was started: its config.yaml (every `auto` resolved), whatever today's defaults
say, with only the keys of `resume.RESUMABLE` changed; anything else typed now must repeat the run's value."""

import logging
import shutil
import sys
from pathlib import Path

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from omegaconf import OmegaConf, open_dict

from protein_mlm import cli, composition
from protein_mlm.composition import compose_checked
from protein_mlm.errors import ConfigError
from protein_mlm.plan import RESOLVED_KEYS, record_resolved, resolve
from protein_mlm.preflight import check_config
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.resume import resume_run
from tests.conftest import CONFIG_DIR, ROOT, TINY, compose_config, run_cli
from tests.test_cli import assert_user_error

STARTED = ["model=tiny", "trainer.max_steps=20", "data.max_length=64"]


def write_run(run_dir: Path, *overrides: str) -> Path:
    """A run dir as train.py leaves it (config.yaml with every `auto` resolved, .hydra/ record, a last.ckpt)."""
    composed = compose_checked("train", list(overrides))
    cfg = compose_config(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir.resolve())
    record_resolved(cfg, resolve(cfg))
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": composed.hydra.runtime.choices}}}),
                   run_dir / ".hydra" / "hydra.yaml")  # fmt: skip
    return run_dir


def other_defaults(tmp_path: Path) -> Path:
    """A copy of configs/ whose defaults moved on (as an upgrade may move them)."""
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    adamw = configs / "optimizer" / "adamw.yaml"
    adamw.write_text(adamw.read_text().replace("lr: 1.0e-3", "lr: 5.0e-4"))
    data = configs / "data" / "swissprot.yaml"
    data.write_text(data.read_text().replace("mask_prob: 0.15", "mask_prob: 0.2"))
    return configs


def test_a_resume_keeps_the_runs_values_after_the_defaults_changed(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "run", *STARTED)
    monkeypatch.setattr(composition, "CONFIG_DIR", other_defaults(tmp_path))
    assert compose_checked("train", []).optimizer.lr == 5e-4  # today's default moved ...
    cfg = resume_run(run_dir, [f"resume={run_dir}"])
    assert cfg.optimizer.lr == 1e-3 and cfg.data.mask_prob == 0.15  # ... the run keeps its own
    assert cfg.scheduler.peak_lr == 1e-3
    assert cfg.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt") and cfg.hydra.run.dir == str(run_dir)


def test_every_resolved_auto_is_recorded_and_restored(tmp_path):
    autos = ["trainer.precision=auto", "model.compile=auto", "data.packing=auto", "data.num_workers=auto"]
    assert sorted(o.split("=")[0] for o in autos) == sorted(RESOLVED_KEYS)
    run_dir = write_run(tmp_path / "run", *STARTED, *autos)
    saved = OmegaConf.load(run_dir / "config.yaml")
    plan = resolve(compose_config(*STARTED, *autos))
    for key, field in RESOLVED_KEYS.items():
        assert OmegaConf.select(saved, key) == getattr(plan, field) != "auto"
    cfg = resume_run(run_dir, [f"resume={run_dir}"])
    assert {key: OmegaConf.select(cfg, key) for key in RESOLVED_KEYS} == {
        key: getattr(plan, field) for key, field in RESOLVED_KEYS.items()
    }


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("optimizer.lr=5e-4", ["optimizer.lr=5e-4 differs from the run's optimizer.lr=0.001", "may not change"]),
        ("model=esm2_8m", ["model=esm2_8m differs from the run's model=tiny"]),
        ("data.mask_prob=0.2", ["data.mask_prob=0.2 differs from the run's data.mask_prob=0.15"]),
        ("trainer.precision=16-mixed", ["trainer.precision", "ckpt_path=<run dir>/checkpoints/last.ckpt"]),
        ("+optimizer.amsgrad=true", ["optimizer.amsgrad=true differs from the run's optimizer.amsgrad=null"]),
        ("~optimizer.eps", ["optimizer.eps"]),
        ("hydra.run.dir=elsewhere", ["hydra.run.dir=elsewhere differs from resume=", "drop hydra.run.dir"]),
    ],
)
def test_a_forbidden_override_is_refused_in_one_line(tmp_path, override, fragments):
    run_dir = write_run(tmp_path / "run", *STARTED)
    with pytest.raises(ConfigError) as error:
        resume_run(run_dir, [f"resume={run_dir}", override])
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_a_repeated_command_line_is_accepted(tmp_path):
    """A requeued job repeats its whole command line: values equal to the run's, however written, are accepted."""
    run_dir = write_run(tmp_path / "run", *STARTED, "optimizer.lr=1e-3")
    same = [*STARTED, "optimizer.lr=0.001", "optimizer=adamw", "data.mask_prob=0.15", f'hydra.run.dir="{run_dir}"']
    cfg = resume_run(run_dir, [*same, f"resume={run_dir}"])
    assert cfg.optimizer.lr == 1e-3 and cfg.model.name == "tiny"


def test_allowed_overrides_are_applied(tmp_path):
    recorder = "+callbacks.recorder._target_=protein_mlm.training.debug.callbacks.BatchRecorder"
    recorded = [recorder, "+callbacks.recorder.path=${paths.output_dir}/b.jsonl"]
    run_dir = write_run(tmp_path / "run", *STARTED, "scheduler=cosine", "scheduler.warmup_steps=4", *recorded)
    now = [
        "trainer.max_steps=30",
        "logger=csv",
        f"paths.cache_dir={tmp_path}/cache",
        "callbacks.progress_bar=null",
        "data.num_workers=2",
        "+callbacks.stop._target_=protein_mlm.training.debug.callbacks.Interrupt",  # a test aid may be added
        "+callbacks.stop.at_step=25",
    ]
    cfg = resume_run(run_dir, [f"resume={run_dir}", *now])
    assert cfg.trainer.max_steps == cfg.scheduler.total_steps == 30  # the schedule's ${trainer.max_steps} follows
    assert list(cfg.logger) == ["csv"]
    assert cfg.logger.csv.save_dir == str(run_dir.resolve())  # today's logger config, in the run's dir
    assert cfg.paths.cache_dir == cfg.data.cache_dir == f"{tmp_path}/cache"  # data.cache_dir follows (${paths...})
    assert cfg.callbacks.progress_bar is None and cfg.data.num_workers == 2 and cfg.callbacks.stop.at_step == 25
    assert list(cfg.hydra.overrides.task) == now  # this invocation's record (.hydra/resume-<time>/overrides.yaml)
    assert cfg.callbacks.recorder.path == f"{run_dir.resolve()}/b.jsonl"  # a saved ${...} override is read as written


def test_an_old_run_dir_resumes_with_its_values(tmp_path, caplog):
    """A config.yaml written before every `auto` was recorded, in a run dir that moved, by code that moved since."""
    run_dir = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_before_layout_move", run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("precision: 32-true", "precision: auto"))
    with caplog.at_level(logging.WARNING):
        cfg = resume_run(run_dir, [f"resume={run_dir}", "trainer.precision=32-true"])  # pins what auto meant
    assert cfg.trainer.precision == "32-true" and cfg.optimizer.lr == 1e-3 and cfg.trainer.val_check_interval == 3
    assert cfg.callbacks.resume_checkpoint.dirpath == str(run_dir.resolve() / "checkpoints")  # not /tmp/premove
    assert cfg.callbacks.resume_checkpoint._target_ == "protein_mlm.training.callbacks.ResumeCheckpoint"
    assert "trainer.precision's `auto`" in caplog.text and "the run dir moved" in caplog.text
    check_config(cfg)  # a valid run


def count_compositions(monkeypatch) -> list[int]:
    calls = []
    original = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("resume", [False, True])
def test_the_cli_composes_a_run_once(tmp_path, monkeypatch, resume):
    """One composition per run: what is checked is what runs (no second compose from a rewritten sys.argv)."""
    run_dir = write_run(tmp_path / "run", *STARTED)
    args = [f"resume={run_dir}"] if resume else [*STARTED, f"hydra.run.dir={tmp_path}/new"]
    quiet_hydra = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    monkeypatch.setattr(sys, "argv", ["train.py", *args, *quiet_hydra])
    calls, checked, ran = count_compositions(monkeypatch), [], []
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled, root_level = [lg.disabled for lg in loggers], logging.root.level
    try:
        cli.run("train", lambda cfg, plan: ran.append(cfg) or {}, lambda cfg: checked.append(cfg) or "plan")
    finally:  # Hydra's logging config disables every existing logger: later tests read theirs (caplog)
        for logger, was_disabled in zip(loggers, disabled):
            logger.disabled = was_disabled
        logging.root.setLevel(root_level)
    assert len(calls) == 1
    checked_task = {k: v for k, v in OmegaConf.to_container(checked[0]).items() if k != "hydra"}
    assert len(ran) == 1 and OmegaConf.to_container(ran[0]) == checked_task  # the checked config is the one run
    assert ran[0].trainer.max_steps == 20 and ran[0].model.name == "tiny"


@pytest.mark.slow
def test_train_py_resumes_with_the_runs_values_and_refuses_a_change(tmp_path, cache_dir):
    """Through `python train.py`: the defaults move (a local configs/ copy) between the start and the resume."""
    quick = [o for o in TINY if not o.startswith("trainer.max_steps")]
    run_dir = tmp_path / "run"
    started = [*quick, "trainer.max_steps=2", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    assert run_cli(*started, cwd=tmp_path).returncode == 0
    other_defaults(tmp_path)  # ./configs now takes precedence: optimizer.lr 5e-4, data.mask_prob 0.2
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert_user_error(
        run_cli(f"resume={run_dir}", "optimizer.lr=5e-4", cwd=tmp_path),
        "optimizer.lr=5e-4 differs from the run's optimizer.lr=0.001",
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing written

    result = run_cli(*started, f"resume={run_dir}", "trainer.max_steps=4", cwd=tmp_path)  # the command repeated
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = OmegaConf.load(run_dir / "config-resume-1.yaml")
    assert (resumed.optimizer.lr, resumed.data.mask_prob, resumed.trainer.max_steps) == (1e-3, 0.15, 4)
    lrs = dict(read_scalars(run_dir)["lr-inverse_sqrt"])
    assert sorted(lrs) == [0, 1, 2, 3] and lrs[3] == pytest.approx(1e-3 * 3 / 4)  # warmup 4 to the run's peak
