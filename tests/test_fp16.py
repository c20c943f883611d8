"""trainer.precision=16-mixed (V100/T4) with the sync-free step: the loss scaler, not the module, handles overflow.

Lightning's fp16 plugin runs on CPU when given a GradScaler explicitly (the CLI refuses fp16 on CPUs, where
Lightning would silently train in bf16), so the scaler's contract is checked here: an overflowing update is skipped
once and the scale backs off, and the token-weighted gradient is the fp32 one after unscaling.
"""

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from protein_mlm.preflight import check_config
from protein_mlm.train import build_datamodule, build_module

INIT_SCALE = 16.0  # low: the summed token loss (~250 here) times the scale must fit fp16 without overflow
OVERFLOW_AT = 2  # the update whose gradients overflow


class Recorder(pl.Callback):
    """Per update: the weights before it, the loss scale after it, the unscaled gradient norm it stepped with."""

    def __init__(self, overflow_at: int | None):
        self.overflow_at, self.weights, self.scales, self.norms = overflow_at, [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:  # an update's first micro-batch
            self.weights.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))

    def on_after_backward(self, trainer, pl_module):
        last = pl_module.window.pending >= trainer.accumulate_grad_batches  # this update's last micro-batch
        if last and trainer.global_step == self.overflow_at:  # what an fp16 overflow leaves in the scaled grads
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0].fill_(float("inf"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after the scaler unscaled the gradients
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.scales.append(scaler.get_scale())


def fit(tiny_cfg, precision: str, overflow_at: int | None) -> Recorder:
    cfg = tiny_cfg("optimizer.fused=false", "trainer.accumulate_grad_batches=2")
    plan = check_config(cfg)
    recorder = Recorder(overflow_at)
    plugins = []
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))]
    torch.manual_seed(0)
    module = build_module(cfg, plan)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=None if plugins else "32-true",
        plugins=plugins,
        max_steps=5,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=build_datamodule(cfg, plan))
    recorder.weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    return recorder


def test_an_overflowing_fp16_update_is_skipped_once_and_the_scale_backs_off(tiny_cfg):
    fp16 = fit(tiny_cfg, "16-mixed", OVERFLOW_AT)
    assert fp16.scales == [INIT_SCALE] * OVERFLOW_AT + [INIT_SCALE / 2] * (5 - OVERFLOW_AT)
    moved = [not torch.equal(a, b) for a, b in zip(fp16.weights, fp16.weights[1:])]
    # Update 0 runs at LR 0 (warmup starts from zero); after it, only the overflowing update left the weights alone.
    assert moved == [0 < i != OVERFLOW_AT for i in range(5)]


def test_fp16_gradients_after_unscaling_are_the_token_weighted_fp32_ones(tiny_cfg):
    fp16, fp32 = fit(tiny_cfg, "16-mixed", None), fit(tiny_cfg, "32-true", None)
    assert fp16.scales == [INIT_SCALE] * 5  # no overflow: the scale never moved
    # The first update starts from the same weights: its unscaled, rescaled gradient is fp32's up to fp16 rounding.
    assert abs(fp16.norms[0] - fp32.norms[0]) / fp32.norms[0] < 2e-2, (fp16.norms[0], fp32.norms[0])
