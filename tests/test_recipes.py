"""Paper recipes: every experiment preset composes, and its resolved schedule matches the paper's values."""

import pytest
from omegaconf import open_dict

from protein_mlm.plan import accumulation_steps, build_schedule
from tests.conftest import compose_config


@pytest.mark.parametrize("size", ["8m", "35m", "150m", "650m", "3b"])
def test_esm2_presets_follow_the_paper(size):
    cfg = compose_config(f"experiment=esm2_{size}")
    assert cfg.model.name == f"esm2_{size}" and cfg.scheduler.name == "lr-linear"
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.eps) == (4e-4, [0.9, 0.98], 1e-8)
    assert cfg.optimizer.weight_decay == 0.01 and cfg.data.mask_prob == 0.15 and cfg.data.max_length == 1024
    assert cfg.model.architecture.hidden_dropout_prob == 0.0 and cfg.model.architecture.token_dropout
    schedule, total = build_schedule(cfg), cfg.trainer.max_steps
    assert total == 500_000
    assert schedule(0) == 0.0 and schedule(1000) == pytest.approx(0.5)
    assert schedule(2000) == pytest.approx(1.0)  # peak after 2,000 warmup steps
    assert schedule(int(0.9 * total)) == pytest.approx(0.1)  # decay ends at 90% ...
    assert schedule(total - 1) == pytest.approx(0.1)  # ... and stays at 0.1 x peak
    middle = (2000 + 0.9 * total) / 2
    assert schedule(int(middle)) == pytest.approx(0.55, abs=1e-5)  # linear in between
    # 2^21 tokens per update on 1 node x 8 GPUs with 16,384-token micro-batches: 16 micro-batches per update.
    with open_dict(cfg):
        cfg.trainer.devices = 8
    assert accumulation_steps(cfg) == 16


def test_esm1b_preset_is_the_seed_schedule():
    cfg = compose_config("experiment=esm1b")
    assert cfg.model.name == "esm1b" and cfg.scheduler.name == "lr-inverse_sqrt"
    schedule = build_schedule(cfg)
    assert schedule(16_000) == 1.0 and schedule(64_000) == pytest.approx(0.5)  # sqrt(16000 / 64000)
    assert accumulation_steps(cfg) == cfg.trainer.accumulate_grad_batches  # no token target given


def test_tokens_per_update_sets_accumulation_and_is_shown_in_the_plan(tiny_cfg, capsys):
    from protein_mlm.train import train

    cfg = tiny_cfg("data.tokens_per_update=1024", "trainer.max_steps=3", "trainer.val_check_interval=6")
    assert accumulation_steps(cfg) == 2  # 1024 / 512-token micro-batches
    train(cfg)
    plan = capsys.readouterr().out
    assert "accumulate_grad_batches" in plan and "training plan" in plan
    line = next(line for line in plan.splitlines() if "accumulate_grad_batches" in line)
    assert line.split()[-2] == "2"


def test_plan_only_prints_the_plan_for_8_gpus_and_trains_nothing(tmp_path, cache_dir):
    from tests.conftest import run_cli

    result = run_cli(
        "experiment=esm2_650m",
        "trainer.devices=8",
        "plan_only=true",
        "print_config=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines() if "│" in line
    }
    assert rows["accumulate_grad_batches"] == "16"  # 2^21 tokens / (16,384 x 8 GPUs)
    assert rows["padded tokens per update (at most)"] == "2,097,152"
    assert rows["warmup steps / total steps"] == "2,000 / 500,000"
    assert rows["peak LR / LR at the last step"] == "0.0004 / 4e-05"
    assert not (tmp_path / "run" / "checkpoints").exists() and not list(
        (tmp_path / "run").glob("events.out.tfevents.*")
    )
