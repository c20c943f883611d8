"""What a user sees when output is redirected (nohup, SLURM, `| tee`), and the loggers a run can write to."""

import csv
import re

import pytest

from tests.conftest import TINY, run_cli

RUN = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "callbacks.prog"))] + [
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "callbacks.plain_progress.every_n_steps=5",
    "callbacks.plain_progress.every_seconds=3600",
]
PROGRESS_LINE = re.compile(r"step (\d+)/20 \| loss \d\.\d{4} \| lr \d\.\d{3}e-0\d \| [\d,]+ tok/s \| epoch 0 \| ")


def test_piped_output_gets_a_progress_line_per_interval_and_train_log_the_whole_run(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*RUN, f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    for text in (result.stdout, log):  # stdout is a pipe here, as under nohup or SLURM
        assert [int(m) for m in PROGRESS_LINE.findall(text)] == [5, 10, 15, 20]
        assert "Done: steps 20, val/loss" in text
    assert "plan: accumulate_grad_batches = 1" in log  # the plan table, as text
    noise = ("litlogger", "LeafSpec", "Total FLOPs", "model summary callbacks", "━━")  # ━━: a progress bar
    assert not [n for n in noise if n in result.stdout + result.stderr]


@pytest.mark.slow
def test_csv_mlflow_and_wandb_loggers_each_get_the_lr_once_per_step(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    result = run_cli(*RUN, "logger=[csv,mlflow,wandb]", f"paths.log_dir={tmp_path}/outputs",
                     f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        csv_lrs = [(int(r["step"]), float(r["lr-inverse_sqrt"])) for r in csv.DictReader(f) if r["lr-inverse_sqrt"]]
    assert [s for s, _ in csv_lrs] == list(range(20))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("protein-mlm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "lr-inverse_sqrt")
    assert sorted(m.step for m in history) == list(range(20))
    assert [v for _, v in csv_lrs] == [m.value for m in sorted(history, key=lambda m: m.step)]

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("*.wandb"))  # the offline run's data, ready for `wandb sync`
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard stays on: the LR audit reads it
    assert "LR audit" not in result.stderr
