"""scripts/gpu_checks.py: every throughput row in one process, budgets that mark rows "not run", nothing GPU-only at
import; the --quick run on a CPU writes the whole table (slow tier)."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_checks  # noqa: E402


def test_import_loads_nothing_gpu_only():
    code = "import sys; import gpu_checks; print(sorted(m for m in sys.modules if m.split('.')[0] in {0}))"
    banned = "{'torch', 'flash_attn', 'transformers', 'pytorch_lightning'}"
    out = subprocess.run(
        [sys.executable, "-c", code.format(banned)], cwd=SCRIPTS, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_row_the_budget_cannot_hold_is_listed_as_not_run(monkeypatch):
    import benchmark
    import torch  # noqa: F401  (loaded before the clock: the row frees its memory through it)

    started = []
    monkeypatch.setattr(benchmark, "measure_row", lambda *a: started.append(a) or time.sleep(30))
    setting = {"max_length": 128, "seconds": 0.1, "warmup": 1}
    assert gpu_checks.run_row("tiny", "ours", 1024, 8, setting, left=5.0)["error"] == "not run: budget"
    assert not started  # the timed window alone would not fit: never started
    begin = time.monotonic()
    result = gpu_checks.run_row("tiny", "ours", 1024, 8, setting, left=5.2)
    assert started and result["error"].startswith("not run: budget (stopped after 5 s)")
    assert 5.0 <= time.monotonic() - begin < 8 and 5.0 <= result["wall"] < 8


def test_children_are_stopped_at_their_budget(tmp_path):
    begin = time.monotonic()
    runs = gpu_checks.run_children(
        {"slow": ["-c", "import time; time.sleep(60)"], "fast": ["-c", "print('done')"]}, 1.0, tmp_path
    )
    assert time.monotonic() - begin < 10
    assert runs["fast"] == (0, "done\n") and runs["slow"][0] == 124
    assert gpu_checks.failure(124, "", 1.0) == "not run: budget (1 s) spent"


def test_summary_lists_not_run_rows_with_their_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks, "header", lambda quick: ["# versions"])  # (imports Lightning: slow)
    summary = gpu_checks.Summary(tmp_path, quick=True)
    summary.not_run("fsdp", "budget (the overall deadline was reached)")
    summary.add("loss", "3.1 vs 3.1", "<= 2e-3 rel.", True, 12.4)
    text = (tmp_path / "summary.md").read_text()
    assert "| fsdp | not run: budget (the overall deadline was reached) | - | info | 0 |" in text
    assert "| loss | 3.1 vs 3.1 | <= 2e-3 rel. | pass | 12 |" in text


@pytest.mark.slow
def test_quick_run_writes_every_row_from_one_process(tmp_path):
    out = tmp_path / "checks"
    env = {**os.environ, "BENCHMARK_WORK_DIR": str(tmp_path / "work"), "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(SCRIPTS / "gpu_checks.py"), "--out", str(out), "--quick", "--deadline", "3000"]
    subprocess.run(command, check=True, capture_output=True, timeout=900, env=env)
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("check", "---"):
            rows[cells[0]] = cells
    throughput = json.loads((out / "throughput.json").read_text())
    expected = [f"throughput tiny (as esm2_150m) {r}" for r in ("ours_packed_compile", "hf_tuned", "ours_packed")]
    expected += [f"throughput tiny (as esm2_650m) {r}" for r in ("ours_packed_compile", "hf_tuned")]
    assert set(expected) <= set(rows)
    assert rows["sync (10 packed updates, tiny)"][1] == "no sync on non-logging steps"
    assert rows["attention (varlen flash vs reference)"][1] == "not run: needs CUDA"
    assert rows["loss: packed eager vs compiled, steps 6-10"][3] == "pass"
    assert any(name.startswith("fsdp comparison code") and "max rel. diff" in r[1] for name, r in rows.items())
    pids = {r["pid"] for model in throughput.values() for r in model.values()}
    assert len(pids) == 1  # every row measured in one process
    for label, model in throughput.items():
        hf = model["hf_tuned"]["real_per_s"]
        for row, r in model.items():
            measured = rows[f"throughput {label} {row}"][1]
            assert r["real_per_s"] > 0 and math.isfinite(r["real_per_s"]) and "nan" not in measured
            assert re.search(r"MFU \d+\.\d%", measured)
            if row != "hf_tuned":  # the ratio is this run's own: the two rows of throughput.json
                ratio = float(re.search(r"([\d.]+)x hf_tuned \(this run\)", measured).group(1))
                assert ratio == pytest.approx(r["real_per_s"] / hf, abs=0.006)
        assert model["ours_packed_compile"]["graphs"] >= 1 and model["hf_tuned"]["graphs"] == 0
    assert all(float(r[4]) >= 0 for r in rows.values())  # every row carries its seconds


def test_a_limit_inside_another_keeps_the_outer_one():
    begin = time.monotonic()
    with pytest.raises(gpu_checks.BudgetExceeded):
        with gpu_checks.time_limit(1.5):
            with pytest.raises(gpu_checks.BudgetExceeded):
                with gpu_checks.time_limit(0.3):
                    time.sleep(5)
            assert time.monotonic() - begin < 1
            with gpu_checks.time_limit(10):  # longer than what is left of the outer limit
                time.sleep(5)
    assert 1.4 < time.monotonic() - begin < 2.5
