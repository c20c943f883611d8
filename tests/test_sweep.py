"""Multirun sweeps end to end: job dirs named by swept values, per-job LR curves, summary files, failures."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.sweep import job_dir_name, swept_keys
from protein_mlm.training import schedules
from tests.conftest import ROOT, TINY, run_cli

SWEEP = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))] + [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
]


def sweep_dir_of(cwd: Path) -> Path:
    (sweep_dir,) = list((cwd / "multirun").glob("*/*"))
    return sweep_dir


def read_summary(sweep_dir: Path) -> dict[str, dict]:
    with open(sweep_dir / "summary.csv") as f:
        return {row["job"]: row for row in csv.DictReader(f)}


@pytest.mark.slow  # three training jobs through train.py -m
def test_warmup_sweep_names_jobs_logs_each_schedule_and_summarises(tmp_path):
    args = ["-m", *SWEEP, f"paths.cache_dir={tmp_path}/cache", "optimizer.lr=1e-3", "scheduler.warmup_steps=10,2,4"]
    result = run_cli(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # max_steps=6 with validation every 3 updates: 2 validations per job, which the sweep warns about up front.
    assert "3 of 3 jobs validate fewer than 3 times (e.g. scheduler.warmup_steps=10: 2)" in result.stderr
    sweep_dir = sweep_dir_of(tmp_path)
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == sorted(f"scheduler.warmup_steps={w}" for w in (2, 4, 10))
    for warmup in (2, 4, 10):
        lrs = read_scalars(sweep_dir / f"scheduler.warmup_steps={warmup}")["lr-inverse_sqrt"]
        assert [s for s, _ in lrs] == list(range(6))
        expected = [1e-3 * schedules.inverse_sqrt(s, warmup_steps=warmup) for s in range(6)]
        assert [v for _, v in lrs] == pytest.approx(expected, rel=1e-6)
    rows = read_summary(sweep_dir)
    assert list(rows) == [f"scheduler.warmup_steps={w}" for w in (2, 4, 10)]  # numeric order, not 10, 2, 4
    assert all(
        r["status"] == "completed" and r["steps"] == "6" and float(r["best_val_loss"]) > 0 for r in rows.values()
    )
    assert (sweep_dir / "summary.png").stat().st_size > 10_000
    table = (sweep_dir / "summary.md").read_text()
    assert table.index("warmup_steps=2 |") < table.index("warmup_steps=4 |") < table.index("warmup_steps=10 |")
    assert "Sweep summary" in result.stdout
    assert f"tensorboard --logdir {sweep_dir.relative_to(tmp_path)}" in result.stdout.strip().splitlines()[-1]

    # The script rebuilds the same summary from the job files alone.
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize_sweep.py"), str(sweep_dir)], capture_output=True, text=True
    )
    assert script.returncode == 0, script.stderr
    assert read_summary(sweep_dir) == rows and (sweep_dir / "summary.png").is_file()


@pytest.mark.slow
def test_a_diverging_job_does_not_end_the_sweep(tmp_path):
    args = ["-m", *SWEEP, f"paths.cache_dir={tmp_path}/cache", "faults.inject_nan_at_step=2,100,200"]
    result = run_cli(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep_dir_of(tmp_path))
    assert rows["faults.inject_nan_at_step=2"]["status"] == "diverged"
    assert rows["faults.inject_nan_at_step=2"]["message"].startswith("step 2:")
    assert rows["faults.inject_nan_at_step=100"]["status"] == "completed"
    assert rows["faults.inject_nan_at_step=200"]["status"] == "completed"


def test_swept_keys_and_job_names(monkeypatch):
    overrides = ["scheduler.warmup_steps=1000,4000", "print_config=false", "optimizer.lr=range(1,3)", "+x=choice(1,2)"]
    assert swept_keys(overrides) == ["optimizer.lr", "scheduler.warmup_steps", "x"]
    monkeypatch.setenv("PROTEIN_MLM_SWEPT_KEYS", "scheduler.warmup_steps")
    assert job_dir_name(["print_config=false", "scheduler.warmup_steps=1000"], 0) == "scheduler.warmup_steps=1000"
    monkeypatch.delenv("PROTEIN_MLM_SWEPT_KEYS")
    assert job_dir_name(["data.train_path=/a/b.fa"], 3) == "data.train_path=_a_b.fa"
    long_name = job_dir_name([f"k{i}=value{i}" for i in range(40)], 0)
    assert len(long_name) <= 120


@pytest.mark.slow
def test_optuna_search_reports_the_best_trial(tmp_path):
    args = [*SWEEP, f"paths.cache_dir={tmp_path}/cache", "hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    result = run_cli(*args, cwd=tmp_path, timeout=600)  # no -m: the search config sets hydra.mode
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    assert (sweep_dir / "optimization_results.yaml").is_file()
    rows = read_summary(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows.values())
    best = min(float(r["best_val_loss"]) for r in rows.values())
    note = (sweep_dir / "summary.md").read_text().split("Best trial: best val/loss ")[1]
    assert float(note.split()[0]) == pytest.approx(best, rel=1e-5)
    assert "optimizer.lr=" in note and "Best trial" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers(tmp_path, launcher):
    args = [
        "-m",
        *SWEEP,
        f"paths.cache_dir={tmp_path}/cache",
        f"hydra/launcher={launcher}",
        "scheduler.warmup_steps=1,2",
    ]
    if launcher == "joblib":
        args.append("hydra.launcher.n_jobs=2")
    result = run_cli(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    rows = read_summary(sweep_dir)
    assert sorted(rows) == ["scheduler.warmup_steps=1", "scheduler.warmup_steps=2"]
    assert all(r["status"] == "completed" for r in rows.values())
    if launcher == "joblib":  # 2 jobs at once share the cores instead of oversubscribing them
        from omegaconf import OmegaConf

        threads = OmegaConf.load(sweep_dir / "scheduler.warmup_steps=1" / "config.yaml").num_threads
        assert threads == max(1, (os.cpu_count() or 1) // 2)


def test_summary_plot_has_lr_train_and_validation_panels_in_numeric_order(tmp_path):
    from protein_mlm.reporting.summary import plot_sweep

    jobs = {w: {"lr-inverse_sqrt": [(0, 0.1), (1, 0.2)], "train/loss": [(0, 3.4), (1, 3.3)], "val/loss": [(1, 3.2)]}
            for w in (100, 30, 5)}  # fmt: skip
    labels = [f"scheduler.warmup_steps={w}" for w in sorted(jobs)]
    panels = plot_sweep([jobs[w] for w in sorted(jobs)], labels, tmp_path / "summary.png")
    titles = [title for title, _ in panels]
    assert titles == ["LR per step", "training loss (EMA 0.9; raw faint)", "validation loss"]
    assert all(legend == labels for _, legend in panels)


@pytest.mark.slow
def test_a_csv_only_sweep_still_gets_the_lr_audit_and_the_summary(tmp_path):
    """logger=csv replaces TensorBoard in the config, yet the run's own TensorBoard record stays."""
    args = ["-m", *SWEEP, "logger=csv", f"paths.cache_dir={tmp_path}/cache", "scheduler.warmup_steps=2,4"]
    result = run_cli(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    rows = read_summary(sweep_dir)
    assert list(rows) == ["scheduler.warmup_steps=2", "scheduler.warmup_steps=4"]
    assert all(r["steps"] == "6" and float(r["best_val_loss"]) > 0 for r in rows.values())
    for job in rows:
        status = json.loads((sweep_dir / job / "status.json").read_text())
        assert status["lr_audit"] == "ok"
        assert (sweep_dir / job / "csv" / "metrics.csv").is_file()
