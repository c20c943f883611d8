"""The project as a wheel: installed outside the checkout, it finds its configs and data and trains."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_trains_from_an_empty_directory(tmp_path):
    wheels, target, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    assert subprocess.run(build, capture_output=True, text=True).returncode == 0
    (wheel,) = wheels.glob("protein_mlm-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)]
    assert subprocess.run(install, capture_output=True, text=True).returncode == 0

    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable checkout
    where = subprocess.run(
        [sys.executable, "-c", "import protein_mlm.cli as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=empty, env=env, capture_output=True, text=True,
    )  # fmt: skip
    module_file, config_dir = where.stdout.split()
    assert module_file.startswith(str(target)) and config_dir.startswith(str(target)), where.stdout + where.stderr

    short = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.accelerator=cpu", "data.max_length=64"]
    run = [str(target / "bin" / "protein-mlm-train"), "experiment=smoke", *short, "hydra.run.dir=run"]
    result = subprocess.run(run, cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done: steps 4" in result.stdout and (empty / "run" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in empty.iterdir()) == [".cache", "run"]  # nothing else written outside the run

    copy = subprocess.run([str(target / "bin" / "protein-mlm-configs"), "my_configs"], cwd=empty, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert copy.returncode == 0 and (empty / "my_configs" / "train.yaml").is_file()
    assert not (empty / "my_configs" / "__init__.py").exists()


# torch APIs the code calls without a guard, and the first torch release that has each (from torch's release notes).
TORCH_API_SINCE = {
    "get_total_norm": (2, 6),
    "clip_grads_with_norm_": (2, 6),
    "torch.compiler.is_compiling": (2, 3),
    "maybe_mark_dynamic": (2, 1),
}


def test_the_torch_floor_has_every_api_the_code_calls():
    """pyproject's `torch>=X.Y` is no older than the newest API in the table that src/ uses."""
    import re

    floor_text = re.search(r'"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    floor = (int(floor_text[1]), int(floor_text[2]))
    source = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    used = {api: since for api, since in TORCH_API_SINCE.items() if api in source}
    assert used, "the table names none of the APIs the code calls"
    assert floor >= max(used.values()), f"torch>={floor} but the code calls {used}"
