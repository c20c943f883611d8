"""The benchmark script runs end to end (tiny model, seconds per row) and writes a complete table."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_benchmark_writes_a_row_per_configuration(tmp_path):
    out = tmp_path / "results.md"
    rows = "hf,ours,ours_packed,bare"
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--rows", rows]
    command += ["--seconds", "1", "--warmup-steps", "2", "--max-length", "128", "--out", str(out)]
    env = {**os.environ, "BENCHMARK_WORK_DIR": str(tmp_path)}
    subprocess.run(command, check=True, capture_output=True, timeout=300, env=env)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(rows) == {"hf", "ours", "ours_packed", "bare"} and not any("error" in r for r in rows.values())
    assert rows["ours"]["real"] / rows["ours"]["padded"] >= 0.9  # token-budget batches
    assert rows["hf"]["real"] / rows["hf"]["padded"] < rows["ours"]["real"] / rows["ours"]["padded"]
    table = out.read_text()
    assert "| hf | 32-true |" in table and "| ours |" in table and "| 1.00 |" in table
