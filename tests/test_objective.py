"""The optimised objective is ESM's (fairseq's): per update, (sum of token losses) / (targets of the whole update),
over every micro-batch and every rank, also for an epoch's last, partial window, before clipping reads the norm."""

import copy
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from protein_mlm.data.masking import IGNORE_INDEX, collate, mask_tokens
from protein_mlm.training.module import MaskedLMModule
from tests.conftest import compose_config

TINY_ARCH = OmegaConf.to_container(compose_config("model=tiny").model.architecture, resolve=True)  # dropout 0


def make_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of different sizes and lengths, so their target counts differ a lot."""
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(count):
        examples = [
            mask_tokens(rng.integers(4, 24, size=int(rng.integers(10, 30 + 40 * b))), rng) for _ in range(b + 1)
        ]
        batches.append(collate(examples))
    return batches


def token_mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """sum(token losses) / sum(targets) over `batches`, written out plainly."""
    losses = [
        F.cross_entropy(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.flatten(0, 1),
            b["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        for b in batches
    ]
    return sum(losses) / sum(int(b["labels"].ne(IGNORE_INDEX).sum()) for b in batches)


def reference_gradient(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gradient of sum(token losses) / sum(targets) over `batches`, by plain autograd."""
    model = copy.deepcopy(model)
    model.zero_grad()
    token_mean_loss(model, batches).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class CaptureGradients(pl.Callback):
    """The gradients each update hands the optimizer, written per rank (the module rescales before any hook)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        torch.save(grads, self.out_dir / f"rank{trainer.global_rank}-step{trainer.global_step}.pt")


class ListModule(MaskedLMModule):
    """Trains on fixed batches: rank r of W gets batches r, r + W, ... (a finite epoch, so a partial last window)."""

    def __init__(self, batches, **kwargs):
        super().__init__(**kwargs)
        self.fixed_batches = batches

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return torch.utils.data.DataLoader(self.fixed_batches[rank::world], batch_size=None)


def fit(tmp_path: Path, batches, accumulate: int, steps: int, **trainer_kwargs) -> MaskedLMModule:
    torch.manual_seed(0)
    module = ListModule(batches, architecture=TINY_ARCH, optimizer=partial(torch.optim.SGD, lr=0.0))
    initial = copy.deepcopy(module.model)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[CaptureGradients(str(tmp_path))],
        **trainer_kwargs,
    )
    trainer.fit(module)
    return initial


def assert_close(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_accumulated_gradient_is_the_token_mean_of_the_whole_update(tmp_path):
    """k=3 over 4 batches: a full window, then the epoch's last, partial window of one batch (lr 0 keeps weights)."""
    batches = make_batches(4)
    targets = [int(b["labels"].ne(IGNORE_INDEX).sum()) for b in batches]
    assert len(set(targets)) == 4  # the micro-batches really differ in weight
    initial = fit(tmp_path, batches, accumulate=3, steps=2)
    assert_close(torch.load(tmp_path / "rank0-step0.pt"), reference_gradient(initial, batches[:3]))
    assert_close(torch.load(tmp_path / "rank0-step1.pt"), reference_gradient(initial, batches[3:]))


def test_two_ddp_ranks_optimise_the_token_mean_over_both(tmp_path):
    """2 gloo ranks x k=3: each update's gradient is that of all 6 micro-batches' tokens together."""
    batches = make_batches(6)
    initial = fit(
        tmp_path, batches, accumulate=3, steps=1, strategy="ddp_spawn", devices=2, use_distributed_sampler=False
    )
    reference = reference_gradient(initial, batches)
    for rank in (0, 1):
        assert_close(torch.load(tmp_path / f"rank{rank}-step0.pt"), reference)


def test_logged_loss_is_the_objective(tmp_path):
    """train/loss of an update is the token-weighted mean the gradient follows, not a mean of batch means."""
    batches = make_batches(3)
    module = ListModule(batches, architecture=TINY_ARCH, optimizer=partial(torch.optim.SGD, lr=0.0))
    logged = {}

    class Keep(pl.loggers.logger.DummyLogger):
        def log_metrics(self, metrics, step=None):
            logged.setdefault(step, {}).update(metrics)

    model = copy.deepcopy(module.model)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, accumulate_grad_batches=3, logger=Keep(), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module)
    with torch.no_grad():
        expected = float(token_mean_loss(model, batches))
    assert abs(logged[0]["train/loss"] - expected) < 1e-6
