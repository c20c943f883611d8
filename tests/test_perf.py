"""FLOP counting against PyTorch's FlopCounterMode, MFU peaks, and the performance switches training with them."""

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from protein_mlm.errors import ConfigError
from protein_mlm.model.esm import build_model
from protein_mlm.model.perf import flops_per_step, lookup_peak_tflops, resolve_peak_tflops
from protein_mlm.preflight import check_config
from protein_mlm.reporting.tblog import read_scalars
from protein_mlm.train import build_datamodule, build_module, train
from tests.conftest import compose_config

ARCH = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=256,
    position_embedding_type="rotary",
    token_dropout=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    emb_layer_norm_before=False,
)


@pytest.mark.parametrize("lengths", [[128, 128], [512]])
def test_flops_match_pytorch_flop_counter(lengths):
    """Our formula vs PyTorch's operator-level count of one forward + backward (matmuls and attention)."""
    torch.manual_seed(0)
    model = build_model(ARCH)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(4, 24, (len(lengths), lengths[0]))
    # The math backend runs attention as bmm's the counter sees (it has no formula for the fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum().backward()
    ours = flops_per_step(params, 2, 64, sum(lengths), sum(n * n for n in lengths))
    # The formula counts biases and LayerNorm weights as matmul weights too: ~1.5% over at this tiny width.
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert ours >= counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [  # dense 16-bit tensor-core / plain fp32 peaks from the vendors' datasheets, by the name torch reports
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.0),
        ("NVIDIA H100 PCIe", "bf16-mixed", 756.0),
        ("NVIDIA H100 NVL", "bf16-mixed", 835.5),  # not the SXM part's 989
        ("NVIDIA H200", "bf16-mixed", 989.0),
        ("NVIDIA H200 NVL", "bf16-mixed", 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312.0),
        ("NVIDIA A100-SXM4-80GB", "32-true", 19.5),
        ("NVIDIA A100-SXM4-80GB", "16-mixed", 312.0),
        ("NVIDIA L4", "bf16-mixed", 121.0),
        ("NVIDIA L40", "bf16-mixed", 181.0),  # not the L4's, nor the L40S's
        ("NVIDIA L40S", "bf16-mixed", 362.0),
        ("Tesla T4", "16-mixed", 65.0),
        ("Tesla T4", "32-true", 8.1),
        ("Tesla V100-SXM2-16GB", "16-mixed", 125.0),
        ("Tesla V100-PCIE-16GB", "16-mixed", 112.0),
        ("Tesla V100-PCIE-32GB", "32-true", 14.0),
        ("NVIDIA L4 Future Edition", "bf16-mixed", None),  # a longer name is another GPU
        ("NVIDIA H10", "bf16-mixed", None),
        ("Some Future GPU", "bf16-mixed", None),
    ],
)
def test_peak_lookup(name, precision, peak):
    assert lookup_peak_tflops(name, precision) == peak


def test_configured_peak_wins_cpu_has_none_and_an_unknown_gpu_warns_once(caplog):
    assert resolve_peak_tflops(2.5, "32-true", None) == 2.5
    assert resolve_peak_tflops(2.5, "32-true", "Some Future GPU") == 2.5
    assert resolve_peak_tflops(None, "32-true", None) is None
    with caplog.at_level("WARNING"):
        assert resolve_peak_tflops(None, "bf16-mixed", "Some Future GPU") is None
    assert [r.getMessage() for r in caplog.records if "peak_tflops" in r.getMessage()] == [
        "no datasheet peak for 'Some Future GPU': MFU is not reported; set perf.peak_tflops=<dense TFLOP/s>"
    ]


def test_mfu_and_tflops_are_logged_for_each_read_interval(tiny_cfg, tmp_path):
    """One value per read of the updates (every log_every_n_steps, before validation, at the end), at its last step."""
    train(tiny_cfg("perf.peak_tflops=0.5", "trainer.log_every_n_steps=4"))
    scalars = read_scalars(tmp_path / "run")
    mfu, tflops = dict(scalars["perf/mfu"]), dict(scalars["perf/tflops"])
    # Reads after updates 4 and 8 (log_every_n_steps), before the validation after 6, for the progress line after
    # 10 (callbacks.plain_progress.every_n_steps), at the end (12).
    assert sorted(mfu) == [3, 5, 7, 9, 11]
    assert sorted(dict(scalars["perf/tokens_per_sec"])) == [3, 5, 7, 9, 11]
    assert all(mfu[s] == pytest.approx(tflops[s] / 0.5) and 0 < mfu[s] < 1 for s in mfu)
    assert sorted(dict(scalars["train/loss"])) == list(range(12))  # every update, logged at its own step


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing activations in backward must not change the numbers, only the memory."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ARCH, activation_checkpointing=checkpointing).train()
        ids = torch.randint(4, 24, (2, 32))
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_tiny_run_trains_with_activation_checkpointing_and_bf16(tiny_cfg, tmp_path):
    """The memory and speed switches train (loss goes down) and keep the per-step LR logging."""
    metrics = train(tiny_cfg("model.activation_checkpointing=true", "trainer.precision=bf16-mixed"))
    losses = [v for _, v in read_scalars(tmp_path / "run")["train/loss"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert metrics["steps"] == 12


@pytest.mark.slow
def test_compiled_model_trains_and_keeps_checkpoint_keys(tiny_cfg, tmp_path):
    """torch.compile (C++ codegen on CPU: slow to start) trains, and checkpoints load into a plain model."""
    from torch._dynamo.utils import counters

    counters.clear()
    train(tiny_cfg("model.compile=true", "trainer.max_steps=6", "trainer.val_check_interval=3"))
    assert counters["stats"]["unique_graphs"] > 0, "compile fell back to eager: dynamo captured no graph"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)


class RecordGradNorm(pl.Callback):
    """The global gradient norm the optimizer stepped with (zero_grad comes after the step)."""

    def __init__(self):
        self.norms = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_gradients_are_clipped(tiny_cfg, precision):
    """Lightning refuses to clip for fused optimizers under AMP; the module clips itself (no scaler in bf16)."""
    cfg = tiny_cfg(f"trainer.precision={precision}", "trainer.gradient_clip_val=0.001")
    assert cfg.optimizer.fused
    recorder = RecordGradNorm()
    datamodule = build_datamodule(cfg, check_config(cfg))
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=3,
        gradient_clip_val=0.001,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    trainer.fit(build_module(cfg, check_config(cfg)), datamodule=datamodule)
    assert len(recorder.norms) == 3 and max(recorder.norms) <= 0.001 * (1 + 1e-4)


def test_fp16_with_fused_optimizer_and_clipping_is_a_config_error_but_auto_unfuses(tiny_cfg):
    gpu_fp16 = ("trainer.accelerator=gpu", "trainer.precision=16-mixed")  # fp16 on a CPU is refused before this
    with pytest.raises(ConfigError, match="optimizer.fused=auto or false"):
        check_config(tiny_cfg(*gpu_fp16, "optimizer.fused=true"))
    assert check_config(tiny_cfg(*gpu_fp16, "optimizer.fused=false")).optimizer["fused"] is False
    assert tiny_cfg().optimizer.fused == "auto"  # the default trains: fused, except fp16 with clipping
    assert check_config(tiny_cfg(*gpu_fp16)).optimizer["fused"] is False
    assert check_config(tiny_cfg(*gpu_fp16, "trainer.gradient_clip_val=null")).optimizer["fused"] is True
    assert check_config(tiny_cfg()).optimizer["fused"] is True


@pytest.mark.parametrize(
    ("setting", "max_steps", "compiler", "expected"),
    [
        ("auto", 260, True, True),  # long enough to earn back the compile
        ("auto", 99, True, False),  # too short
        ("auto", 260, False, False),  # no compiler: eager, without a warning
        (True, 10, True, True),  # asked for explicitly
        (True, 260, False, False),  # asked for, impossible: eager with a warning
        (False, 260, True, False),
    ],
)
def test_model_compile_setting_resolves(monkeypatch, caplog, setting, max_steps, compiler, expected):
    from protein_mlm.model import esm as model
    from protein_mlm.plan import resolve_compile

    monkeypatch.setattr(model.shutil, "which", lambda name: "/usr/bin/g++" if compiler else None)
    monkeypatch.delenv("CXX", raising=False)
    assert resolve_compile(setting, max_steps, on_gpu=False) is expected
    assert ("model.compile ignored" in caplog.text) == (setting is True and not compiler)


def test_model_compile_rejects_other_values():
    with pytest.raises(ConfigError, match="model.compile='yes' must be true, false or auto"):
        check_config(compose_config("model.compile=yes"))
