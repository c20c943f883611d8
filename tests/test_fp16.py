"""trainer.precision=16-mixed (V100/T4) with the sync-free step: the loss scaler, not the module, handles overflow.

Lightning's fp16 plugin runs on CPU when given a GradScaler explicitly (the CLI refuses fp16 on CPUs, where
Lightning would silently train in bf16), so the scaler's contract is checked here: an overflowing update is skipped
once and the scale backs off, and the token-weighted gradient is the fp32 one after unscaling.
"""

import dataclasses

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_lightning.plugins.precision import MixedPrecision

from protein_mlm.data.masking import IGNORE_INDEX, collate, mask_tokens
from protein_mlm.model.esm import build_model
from protein_mlm.plan import loss_divisor
from protein_mlm.preflight import check_config
from protein_mlm.train import build_datamodule, build_module
from tests.conftest import compose_config

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


def fit(tiny_cfg, precision: str, overflow_at: int | None, *overrides, init_scale=INIT_SCALE, steps=5, acc=2):
    cfg = tiny_cfg("optimizer.fused=false", f"trainer.accumulate_grad_batches={acc}", *overrides)
    plan = check_config(cfg)  # 32-true on this CPU; the fp16 plan's loss divisor, as a T4 or V100 run resolves it
    plan = dataclasses.replace(plan, loss_divisor=loss_divisor(cfg, precision))
    recorder = Recorder(overflow_at)
    plugins = []
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))]
    torch.manual_seed(0)
    module = build_module(cfg, plan)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=None if plugins else "32-true",
        plugins=plugins,
        max_steps=steps,
        accumulate_grad_batches=acc,
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


def test_the_fp16_plan_keeps_a_realistic_micro_batch_finite_at_the_default_loss_scale():
    """GradScaler's own check (unscale_ -> found_inf) on one 131k-token micro-batch (~19.6k targets) at its default
    init_scale: the summed loss overflows fp16 gradients; divided by the plan's loss divisor, none does."""
    cfg = compose_config("model=tiny", "trainer=cpu", "data.max_length=64", "data.max_tokens=131072")
    divisor = loss_divisor(cfg, "16-mixed")
    assert divisor == 131072 and loss_divisor(cfg, "bf16-mixed") == 1
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.model.architecture, resolve=True))
    rng = np.random.default_rng(0)
    batch = collate([mask_tokens(rng.integers(4, 24, size=64), rng) for _ in range(2048)])
    assert batch["labels"].ne(IGNORE_INDEX).sum() >= 16_384
    found_inf = {}
    for name, divide_by in (("summed", 1.0), ("plan", divisor)):
        model.zero_grad()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu")  # init_scale 65,536
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
        scaler.scale(loss_sum / divide_by).backward()
        scaler.unscale_(optimizer)
        found_inf[name] = float(sum(scaler._found_inf_per_device(optimizer).values()))
    assert found_inf == {"summed": 1.0, "plan": 0.0}


@pytest.mark.slow
def test_fp16_at_the_default_loss_scale_trains_from_the_first_updates_with_realistic_batches(tiny_cfg):
    """>= 16k target tokens per micro-batch at GradScaler's default init_scale (65,536): the summed loss overflowed
    fp16 gradients and skipped the first updates while the scale backed off; the plan's per-micro-batch divisor keeps
    them finite, and the module's rescale makes the step the token mean again."""
    big = ("data.max_tokens=131072", "trainer.gradient_clip_val=null")  # ~19k targets per micro-batch
    fp16 = fit(tiny_cfg, "16-mixed", None, *big, init_scale=2.0**16, steps=3, acc=1)
    assert fp16.scales == [2.0**16] * 3  # no update skipped, the scale never backed off
    moved = [not torch.equal(a, b) for a, b in zip(fp16.weights, fp16.weights[1:])]
    assert moved == [False, True, True]  # update 0 runs at LR 0 (warmup from zero); the others step
