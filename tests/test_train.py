"""Tiny end-to-end training runs, checked through what they write: TensorBoard events, checkpoints, config."""

import math
from pathlib import Path

import pytest
import torch

from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import train
from protein_mlm.training import schedules
from protein_mlm.training.callbacks import TrainingDiverged


def run(cfg) -> tuple[dict, dict, Path]:
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    return metrics, read_scalars(run_dir), run_dir


def expected_lrs(peak, steps, **kwargs):
    return [peak * schedules.inverse_sqrt(s, **kwargs) for s in range(steps)]


def test_lr_is_logged_once_per_optimizer_step_and_equals_the_schedule(tiny_cfg):
    cfg = tiny_cfg("optimizer.lr=1e-3")
    metrics, scalars, run_dir = run(cfg)

    lrs = scalars["lr-inverse_sqrt"]
    assert [step for step, _ in lrs] == list(range(12))
    assert [v for _, v in lrs] == pytest.approx(expected_lrs(1e-3, 12, warmup_steps=4), rel=1e-6)
    assert [step for step, _ in scalars["train/loss"]] == list(range(12))
    assert [step for step, _ in scalars["train/grad_norm"]] == list(range(12))
    assert all(0.5 < v <= 1.0 for _, v in scalars["perf/padding_efficiency"])
    tokens = [v for _, v in scalars["train/tokens_seen"]]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))
    assert [step for step, _ in scalars["val/loss"]] == [5, 11]  # after updates 6 and 12
    assert metrics["steps"] == 12 and math.isfinite(metrics["val/loss"])
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert 0 <= metrics["val/accuracy"] <= 1

    assert metrics["lr_audit"] == "ok"
    assert (run_dir / "lr_schedule.png").stat().st_size > 10_000
    assert (run_dir / "config.yaml").is_file()
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-step") for name in checkpoints)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # plain containers only
    assert ckpt["global_step"] == 12
    assert ckpt["hyper_parameters"]["architecture"]["hidden_size"] == 32


def test_gradient_accumulation_still_logs_one_lr_per_optimizer_step(tiny_cfg):
    cfg = tiny_cfg("trainer.accumulate_grad_batches=3", "trainer.max_steps=5", "trainer.val_check_interval=9")
    _, scalars, _ = run(cfg)
    lrs = scalars["lr-inverse_sqrt"]
    assert [step for step, _ in lrs] == list(range(5))
    assert [v for _, v in lrs] == pytest.approx(expected_lrs(cfg.optimizer.lr, 5, warmup_steps=4), rel=1e-6)
    assert [step for step, _ in scalars["train/loss"]] == list(range(5))


def test_lr_every_step_even_when_train_metrics_are_logged_rarely(tiny_cfg):
    _, scalars, _ = run(tiny_cfg("trainer.log_every_n_steps=50"))
    assert [step for step, _ in scalars["lr-inverse_sqrt"]] == list(range(12))


def test_parameter_groups_are_logged_by_name(tiny_cfg):
    cfg = tiny_cfg("scheduler=linear", "scheduler.warmup_steps=3", "optimizer.no_decay_bias_and_norm=true")
    _, scalars, _ = run(cfg)
    expected = [cfg.optimizer.lr * schedules.linear(s, warmup_steps=3, total_steps=12) for s in range(12)]
    for group in ("decay", "no_decay"):
        lrs = scalars[f"lr-linear/{group}"]
        assert [step for step, _ in lrs] == list(range(12))
        assert [v for _, v in lrs] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_same_seed_same_run(tiny_cfg, tmp_path):
    first = run(tiny_cfg("trainer.max_steps=4", "trainer.val_check_interval=4"))[1]["train/loss"]
    cfg = tiny_cfg("trainer.max_steps=4", "trainer.val_check_interval=4")
    cfg.paths.output_dir = str(tmp_path / "again")
    second = run(cfg)[1]["train/loss"]
    assert first == second


def test_fast_dev_run_runs_one_batch_of_each(tiny_cfg):
    metrics = train(tiny_cfg("debug=fast_dev_run"))
    assert metrics["steps"] == 1 and math.isfinite(metrics["val/loss"])


def test_nan_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tiny_cfg):
    cfg = tiny_cfg("faults.inject_nan_at_step=8")
    with pytest.raises(TrainingDiverged, match="diverged at step 8: loss is nan"):
        train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # saved at the validation after step 6, not overwritten
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_audit_flags_a_scheduler_stepped_per_epoch(tiny_cfg, caplog):
    metrics, _, _ = run(tiny_cfg("scheduler.interval=epoch"))  # the seed's original mistake
    assert "11 of 12 logged steps differ from the plan" in metrics["lr_audit"]
    assert "LR audit" in caplog.text and "scheduler.interval=step" in caplog.text


def test_training_and_evaluation_make_no_network_call(tiny_cfg, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"network call: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = tiny_cfg("trainer.max_steps=3", "trainer.val_check_interval=3")
    assert train(cfg)["steps"] == 3

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from protein_mlm.inference.evaluate import evaluate
    from tests.conftest import CONFIG_DIR

    fasta = Path(cfg.paths.output_dir).parent / "x.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"ckpt_path={cfg.paths.output_dir}", f"data.val_path={fasta}"])
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(fasta.parent / "eval")
    assert evaluate(eval_cfg)["sequences"] == 1


def test_guard_patience_counts_updates_of_the_real_loss_with_accumulation(tiny_cfg):
    """k=3: the guard sees each update's token-mean loss (~3.4 for a fresh model), not loss / 3."""
    cfg = tiny_cfg(
        "trainer.accumulate_grad_batches=3",
        "callbacks.divergence_guard.max_loss=2.0",
        "callbacks.divergence_guard.patience=3",
    )
    with pytest.raises(TrainingDiverged, match=r"diverged at step 2: loss above 2.0 for 3 updates \(now 3\.\d+\)"):
        train(cfg)


def test_loss_spike_warning_names_the_update_loss_and_the_guard_is_checkpointed(tiny_cfg, caplog):
    """k=3 through Trainer.fit: the warning's loss is the logged train/loss of that step; the windows are saved."""
    cfg = tiny_cfg("trainer.accumulate_grad_batches=3", "callbacks.divergence_guard.spike_factor=0.5")
    with caplog.at_level("WARNING"):
        train(cfg)
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    losses = dict(read_scalars(Path(cfg.paths.output_dir))["train/loss"])
    assert spikes == [f"loss spike at step {s}: {losses[s]:.4g}, over 0.5 x the recent median" for s in range(10, 12)]
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    assert state["DivergenceGuard"]["recent"] == pytest.approx([losses[s] for s in range(12)], rel=1e-6)


def test_a_nan_update_is_skipped_on_the_device_and_reported_at_the_next_read(tiny_cfg, monkeypatch):
    """Fused AdamW skips the non-finite update itself (no host read); the guard raises when the updates are read."""
    import protein_mlm.train as train_module

    built, build_module = [], train_module.build_module
    monkeypatch.setattr(train_module, "build_module", lambda *args: built.append(build_module(*args)) or built[-1])
    with pytest.raises(TrainingDiverged, match="diverged at step 2: loss is nan"):
        train(tiny_cfg("faults.inject_nan_at_step=2", "trainer.log_every_n_steps=10"))
    (module,) = built
    assert module.trainer.global_step == 6  # read before the validation after update 6: updates 3-5 ran on
    assert all(torch.isfinite(p).all() for p in module.parameters())
    optimizer = module.trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in module.parameters() if p in optimizer.state} == {5}  # 6 - 1
