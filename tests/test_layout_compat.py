"""A run made before the package moved into subpackages (data/, model/, training/, ...) still resumes and exports.

tests/fixtures/run_before_layout_move/ is a tiny 6-step CPU run written by the flat layout's code (commit 066c411, the
last before the move): its checkpoint, saved overrides and config.yaml are read by today's code.
"""

import json
import shutil

from transformers import EsmForMaskedLM

from protein_mlm.model.checkpoints import export_hf
from protein_mlm.reporting.tblog import read_scalars
from tests.conftest import ROOT, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "run_before_layout_move"


def test_a_run_from_before_the_move_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    result = run_cli(f"resume={run}", "trainer.max_steps=9", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["steps"] == 9
    assert sorted(dict(read_scalars(run)["train/loss"])) == list(range(9))  # steps 0-5 then 6-8, one TB run
    model = EsmForMaskedLM.from_pretrained(export_hf(run, tmp_path / "hf"))
    assert model.config.num_hidden_layers == 2
