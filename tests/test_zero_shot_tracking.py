"""callbacks.zero_shot: DMS Spearman logged at every validation (one process and 2 gloo DDP ranks), in the summary."""

import math

import numpy as np
import pandas as pd
import pytest

from protein_mlm.errors import UserError
from protein_mlm.inference.loading import load_model
from protein_mlm.inference.score import spearman
from protein_mlm.inference.tracking import load_scan
from protein_mlm.inference.zero_shot import score_mutants
from protein_mlm.reporting.summary import write_summary
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import train
from tests.conftest import TINY, run_cli

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRESVVRETEVAWRHCKHCLRIEQVQTVTAGDLLDGNL"  # noqa: E501
VALIDATIONS = [5, 11]  # TINY: 12 updates, validation every 6 (logged at the step before)


def write_scan(path, n=24) -> str:
    """A DMS CSV of `n` single mutants numbered from 1, with random measured scores."""
    rng = np.random.default_rng(0)
    positions = rng.choice(len(SEQUENCE), size=n, replace=False)
    mutants = [f"{SEQUENCE[p]}{p + 1}{'A' if SEQUENCE[p] != 'A' else 'W'}" for p in positions]
    pd.DataFrame({"mutant": mutants, "DMS_score": rng.normal(size=n)}).to_csv(path, index=False)
    return str(path)


def zero_shot_override(csv: str, strategy: str = "masked-marginals") -> str:
    scan = f"{{name:demo,csv:'{csv}',sequence:{SEQUENCE},offset_idx:1}}"
    target = "protein_mlm.inference.tracking.ZeroShotScores"
    return f"callbacks.zero_shot={{_target_:{target},strategy:{strategy},scans:[{scan}]}}"


def test_one_process_logs_spearman_at_every_validation(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(zero_shot_override(write_scan(tmp_path / "dms.csv"), "wt-marginals"))
    train(cfg)
    series = read_scalars(cfg.paths.output_dir)["val/zero_shot/demo_spearman"]
    assert [step for step, _ in series] == VALIDATIONS and all(-1 <= rho <= 1 for _, rho in series)
    assert "zero-shot scoring per validation" in capsys.readouterr().out  # the plan table shows the cost


def test_a_bad_scan_is_a_one_line_error_before_training(tiny_cfg, tmp_path):
    csv = tmp_path / "dms.csv"
    csv.write_text("mutant,DMS_score\nK1A,0.3\n")  # residue 1 is M
    with pytest.raises(UserError, match=r"row 1 \(line 2\): mutant K1A names wild type K"):
        train(tiny_cfg(zero_shot_override(str(csv))))


@pytest.mark.slow
def test_two_ddp_ranks_split_the_scan_and_the_sweep_summary_shows_it(tmp_path, cache_dir):
    run_dir = tmp_path / "sweep" / "job"
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    result = run_cli(
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "num_threads=1",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        zero_shot_override(write_scan(tmp_path / "dms.csv", n=25)),  # odd: the ranks get 13 and 12 mutants
        cwd=tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "about 13 per rank" in result.stdout
    series = read_scalars(run_dir)["val/zero_shot/demo_spearman"]
    assert [step for step, _ in series] == VALIDATIONS and all(math.isfinite(rho) for _, rho in series)
    # The gathered scores are the whole scan's: the same rho as one process scoring the final weights.
    scan = load_scan({"name": "demo", "csv": str(tmp_path / "dms.csv"), "sequence": SEQUENCE, "offset_idx": 1})
    model = load_model(run_dir / "checkpoints" / "last.ckpt").model
    rho, n = spearman(scan.measured, score_mutants(model, SEQUENCE, scan.mutants, "masked-marginals"))
    assert n == 25 and rho == pytest.approx(series[-1][1], abs=1e-6)
    (row,) = write_summary(tmp_path / "sweep")
    assert row["zero_shot/demo_spearman"] == series[-1][1]
    assert "zero_shot/demo_spearman" in (tmp_path / "sweep" / "summary.md").read_text()
