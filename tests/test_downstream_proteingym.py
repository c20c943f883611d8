"""Every ProteinGym assay in one command: per-assay CSVs equal to single runs, a summary, resumable; the zero-shot
callback reads the same reference file."""

import numpy as np
import pandas as pd
import pytest

from protein_mlm.errors import UserError
from protein_mlm.inference import proteingym, score
from protein_mlm.inference.tracking import ZeroShotScores
from tests.test_downstream import WILD_TYPE, fair_esm, hf_dir  # noqa: F401 (fixtures)

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def assay_frame(target: str, start: int, seed: int) -> pd.DataFrame:
    """Singles numbered from `start` (ProteinGym's start_idx), two doubles and a triple, random measurements."""
    rng = np.random.default_rng(seed)
    singles = [f"{a}{i + start}{AMINO[(i * 7 + seed) % 20]}" for i, a in enumerate(target) if i % 3 == seed % 3]
    singles = [m for m in singles if m[0] != m[-1]]
    mutants = [*singles, f"{singles[0]}:{singles[2]}", f"{singles[1]}:{singles[4]}", ":".join(singles[5:8])]
    return pd.DataFrame({"mutant": mutants, "DMS_score": rng.normal(size=len(mutants)), "DMS_score_bin": 1})


@pytest.fixture
def benchmark(tmp_path):
    """3 assays on parts of WILD_TYPE with start_idx 1, 5 and 12, and a reference file as ProteinGym's."""
    folder = tmp_path / "DMS_ProteinGym_substitutions"
    folder.mkdir()
    rows = []
    for n, (dms_id, start) in enumerate(
        [("AAA_HUMAN_Doe_2020", 1), ("BBB_YEAST_Roe_2021", 5), ("CCC_ECOLI_Poe_2022", 12)]
    ):
        target = WILD_TYPE[start - 1 : start - 1 + 20 + n * 3]
        assay_frame(target, start, n).to_csv(folder / f"{dms_id}.csv", index=False)
        rows.append({"DMS_id": dms_id, "DMS_filename": f"{dms_id}.csv", "target_seq": target, "start_idx": start})
    pd.DataFrame(rows).assign(DMS_number_single_mutants=10).to_csv(tmp_path / "DMS_substitutions.csv", index=False)
    return tmp_path / "DMS_substitutions.csv", folder


def args_for(model, reference, folder, out, *extra):
    argv = ["--model-location", str(model), "--dms-mapping", str(reference), "--dms-input", str(folder)]
    return score.create_parser().parse_args(
        [*argv, "--dms-output", str(out), "--scoring-strategy", "masked-marginals", *extra]
    )


def test_all_assays_equal_single_runs_and_resume(hf_dir, benchmark, tmp_path, monkeypatch, capsys):  # noqa: F811
    reference, folder = benchmark
    out = tmp_path / "scores"
    summary = proteingym.run(args_for(hf_dir, reference, folder, out))
    table = pd.read_csv(reference)
    for row in table.itertuples():
        single = tmp_path / f"single_{row.DMS_id}.csv"
        argv = [
            "--model-location",
            str(hf_dir),
            "--sequence",
            row.target_seq,
            "--dms-input",
            str(folder / row.DMS_filename),
        ]
        argv += [
            "--dms-output",
            str(single),
            "--offset-idx",
            str(row.start_idx),
            "--scoring-strategy",
            "masked-marginals",
        ]
        expected = score.run(score.create_parser().parse_args(argv))
        written = pd.read_csv(out / f"{row.DMS_id}.csv")
        assert list(written.columns) == ["mutant", "DMS_score", "DMS_score_bin", str(hf_dir)]
        pd.testing.assert_frame_equal(written, pd.read_csv(single))
        rho, n = score.spearman(expected["DMS_score"].to_numpy(), expected[str(hf_dir)].to_numpy())
        line = summary[summary["DMS_id"] == row.DMS_id].iloc[0]
        assert line["Spearman"] == pytest.approx(rho) and line["n"] == n == len(expected)
    on_disk = pd.read_csv(out / "summary.csv")
    assert list(on_disk.columns) == ["DMS_id", "model", "Spearman", "n"] and len(on_disk) == 4
    assert on_disk["Spearman"].iloc[3] == pytest.approx(on_disk["Spearman"].iloc[:3].mean())
    # A rerun scores nothing: every (assay, model) is already written.
    monkeypatch.setattr(score, "score_with_bar", lambda *a: pytest.fail("a finished assay was scored again"))
    capsys.readouterr()
    proteingym.run(args_for(hf_dir, reference, folder, out))
    assert "3 of 3 assays already scored" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"other settings \(scoring_strategy\)"):
        proteingym.run(args_for(hf_dir, reference, folder, out, "--scoring-strategy", "wt-marginals"))


def test_chosen_assays_and_a_wrong_id(hf_dir, benchmark, tmp_path):  # noqa: F811
    reference, folder = benchmark
    summary = proteingym.run(args_for(hf_dir, reference, folder, tmp_path / "o", "--dms-ids", "BBB_YEAST_Roe_2021"))
    assert summary["DMS_id"].tolist() == ["BBB_YEAST_Roe_2021", "mean"]
    assert [p.name for p in sorted((tmp_path / "o").glob("*_*.csv"))] == ["BBB_YEAST_Roe_2021.csv"]
    with pytest.raises(UserError, match="--dms-ids NOPE not in"):
        proteingym.run(args_for(hf_dir, reference, folder, tmp_path / "p", "--dms-ids", "NOPE"))


def test_the_callback_reads_the_reference_file(benchmark):
    reference, folder = benchmark
    callback = ZeroShotScores(reference=str(reference), dms_folder=str(folder), dms_ids=["CCC_ECOLI_Poe_2022"])
    (scan,) = callback.scans
    assert scan.name == "CCC_ECOLI_Poe_2022" and scan.sequence == WILD_TYPE[11:37]
    assert scan.mutants[0][0].index == 2  # mutant numbered 14 with start_idx 12
