"""LR schedule preview: the plotted points are the schedule function's values, one curve per combination."""

import subprocess
import sys

import pytest

from protein_mlm.preview import preview
from protein_mlm.reporting.lr_plan import audit_logged_lrs, plotted_steps
from protein_mlm.sweep import expand_sweep
from protein_mlm.training import schedules
from tests.conftest import ROOT


def test_expand_sweep_gives_every_combination():
    combos, swept = expand_sweep(["scheduler=inverse_sqrt,linear", "scheduler.warmup_steps=10,20", "seed=1"])
    assert swept == ["scheduler", "scheduler.warmup_steps"]
    assert len(combos) == 4 and ["scheduler=linear", "scheduler.warmup_steps=20", "seed=1"] in combos


def test_plotted_points_equal_the_schedule_functions(tmp_path):
    out = tmp_path / "lr.png"
    overrides = ["scheduler=inverse_sqrt,linear", "scheduler.warmup_steps=100", "trainer.max_steps=10000"]
    curves, figure = preview(overrides, out=out)
    assert out.stat().st_size > 10_000
    lines = figure.axes[0].lines
    assert [line.get_label() for line in lines] == ["scheduler=inverse_sqrt", "scheduler=linear"]
    formulas = [
        lambda s: schedules.inverse_sqrt(s, warmup_steps=100),
        lambda s: schedules.linear(s, warmup_steps=100, total_steps=10_000),
    ]
    peak = curves[0][2]
    for line, formula in zip(lines, formulas):
        steps, lrs = line.get_xdata(), line.get_ydata()
        assert list(steps) == plotted_steps(10_000) and steps[-1] == 9999
        assert list(lrs) == pytest.approx([peak * formula(int(s)) for s in steps], rel=1e-12)


@pytest.mark.slow
def test_script_writes_the_png_and_rejects_bad_config(tmp_path):
    script = ROOT / "scripts" / "plot_schedule.py"
    args = [sys.executable, str(script), "scheduler.warmup_steps=16000", "trainer.max_steps=500000"]
    ok = subprocess.run([*args, f"--out={tmp_path}/x.png"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "x.png").is_file() and "step 499999" in ok.stdout
    two = subprocess.run(
        [*args, f"--out={tmp_path}/y.png", "--also", "scheduler=linear trainer.max_steps=100"],
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0 and "lr-inverse_sqrt" in two.stdout and "lr-linear" in two.stdout
    bad = subprocess.run([*args, "scheduler.warmup_steps=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_audit_table():
    planned = [0.0, 0.5, 1.0, 0.9]
    assert audit_logged_lrs([(0, 0.0), (1, 0.5), (2, 1.0), (3, 0.9)], planned) is None
    assert audit_logged_lrs([(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)], planned).startswith("3 of 4 logged steps")
    assert "1 steps have no logged LR" in audit_logged_lrs([(0, 0.0), (2, 1.0), (3, 0.9)], planned)
