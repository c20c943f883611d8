"""One behavioural test per Lightning seam (training/lightning_seams.py): each runs a tiny `Trainer.fit` and asserts the
guarantee that depends on the seam, its name in the message, so a Lightning upgrade that breaks one fails here, loudly.

`make lock` runs this file first, then the whole suite (these tests again), before any pin moves.
"""

import re
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from protein_mlm.training import lightning_seams

BATCHES = 5  # a finite epoch: two windows of 2 and a partial window of 1 at accumulate_grad_batches=2


class Tiny(pl.LightningModule):
    """A linear model on fixed data that records what each micro-batch saw."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[tuple[int, int, bool]] = []  # (batch_idx, global_step, is_last_batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch_idx, self.trainer.global_step, lightning_seams.is_last_batch(self.trainer)))
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(BATCHES * 2, dtype=torch.float32).view(BATCHES, 2), batch_size=1)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Probe(pl.Callback):
    """Runs `action(trainer, batch_idx)` at the start of every training batch."""

    def __init__(self, action):
        self.action = action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.action(trainer, batch_idx)


def fit(tmp_path, *callbacks, module=None, ckpt_path=None, **trainer_args) -> Tiny:
    module = module or Tiny()
    args = dict(max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **(args | trainer_args),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def test_learning_rate_stats_are_the_optimizers_lr(tmp_path):
    monitor, logged = LearningRateMonitor(logging_interval="step"), []
    lr = lambda t: t.optimizers[0].param_groups[0]["lr"]  # noqa: E731
    probe = Probe(lambda t, _: logged.append((lightning_seams.learning_rate_stats(monitor, t), lr(t))))
    fit(tmp_path, monitor, probe, logger=CSVLogger(tmp_path))
    expected = [0.1 / (i // 2 + 1) for i in range(BATCHES)]  # LambdaLR's 1/(s+1) at the updates done before batch i
    message = "seam learning_rate_stats (LearningRateMonitor._extract_stats)"
    assert all(stats.keys() == {"lr-SGD"} for stats, _ in logged), message
    assert [stats["lr-SGD"] for stats, _ in logged] == [value for _, value in logged] == pytest.approx(expected), (
        message
    )


def test_logger_step_counts_the_updates_done(tmp_path):
    steps = []
    fit(tmp_path, Probe(lambda t, i: steps.append((i, lightning_seams.logger_step(t), t.global_step))))
    expected = [(i, i // 2, i // 2) for i in range(BATCHES)]  # updates done before batch i
    assert steps == expected, "seam logger_step (epoch_loop._batches_that_stepped)"


def test_is_last_batch_marks_the_partial_window(tmp_path):
    module = fit(tmp_path)
    assert [last for _, _, last in module.seen] == [False] * (BATCHES - 1) + [True], "seam is_last_batch"
    assert module.trainer.global_step == 3, "seam is_last_batch: Lightning steps on the epoch's last, partial window"


def test_dump_checkpoint_is_what_save_checkpoint_writes(tmp_path):
    dumped = {}

    class Save(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            dumped.update(lightning_seams.dump_checkpoint(trainer))
            trainer.save_checkpoint(tmp_path / "saved.ckpt")

    fit(tmp_path, Save())
    saved = torch.load(tmp_path / "saved.ckpt", weights_only=False)
    message = "seam dump_checkpoint (trainer._checkpoint_connector.dump_checkpoint)"
    assert dumped.keys() == saved.keys() and dumped["global_step"] == saved["global_step"] == 3, message
    for name, value in saved["state_dict"].items():
        assert torch.equal(dumped["state_dict"][name], value), message
    assert dumped["loops"] == saved["loops"], message


def test_rewind_to_last_update_resumes_at_the_window_start(tmp_path):
    path = tmp_path / "mid-window.ckpt"

    def save_inside_window(trainer, batch_idx):  # batch 2 is done, batch 3 would finish the window [2, 3]
        if batch_idx == 3:
            checkpoint = lightning_seams.dump_checkpoint(trainer)
            lightning_seams.rewind_to_last_update(checkpoint, 1, trainer.val_check_batch)
            trainer.strategy.save_checkpoint(checkpoint, path)

    fit(tmp_path, Probe(save_inside_window))
    resumed = fit(tmp_path, ckpt_path=path)
    message = "seam rewind_to_last_update (the checkpoint's 'loops' counters)"
    assert resumed.seen[0][:2] == (2, 1), f"{message}: resumed at {resumed.seen[0][:2]}, not window start (2, 1)"
    assert [i for i, _, _ in resumed.seen] == [2, 3, 4], message
    assert resumed.trainer.global_step == 3, f"{message}: the windows shifted"


def test_skip_sigterm_broadcast_leaves_no_broadcast(tmp_path, monkeypatch):
    broadcasts = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: broadcasts.append(tensor.clone()))
    outcome = {}

    def check(trainer, batch_idx):
        if batch_idx:
            return
        trainer._signal_connector.received_sigterm = True  # as Lightning's own handler sets it
        loop = trainer.fit_loop.epoch_loop
        with pytest.raises(SIGTERMException):  # what the seam removes: a broadcast, a host read, a raise
            loop._broadcast_sigterm_tensor()
        outcome["before"] = len(broadcasts)
        lightning_seams.skip_sigterm_broadcast(trainer)
        loop._broadcast_sigterm_tensor()
        outcome["after"] = len(broadcasts) - outcome["before"]
        lightning_seams.clear_lightning_sigterm(trainer)

    fit(tmp_path, Probe(check))
    assert outcome == {"before": 1, "after": 0}, f"seam skip_sigterm_broadcast: {outcome}"


@pytest.mark.parametrize("cleared", [True, False])
def test_clear_lightning_sigterm_lets_training_go_on(tmp_path, cleared):
    def receive(trainer, batch_idx):
        if batch_idx == 1:
            trainer._signal_connector.received_sigterm = True  # as Lightning's own handler sets it
            if cleared:
                lightning_seams.clear_lightning_sigterm(trainer)

    if not cleared:  # the control: Lightning raises at the end of this batch, inside the accumulation window
        with pytest.raises(SIGTERMException):
            fit(tmp_path, Probe(receive))
        return
    module = fit(tmp_path, Probe(receive))
    assert len(module.seen) == BATCHES, "seam clear_lightning_sigterm (trainer._signal_connector.received_sigterm)"


def test_described_progress_bar_names_the_training_bar(tmp_path):
    bar, descriptions = lightning_seams.DescribedRichProgressBar(), []
    probe = Probe(lambda t, _: descriptions.append(bar.progress.tasks[bar.train_progress_bar_id].description))
    pl.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar, probe],
    ).fit(Tiny())
    assert descriptions == ["Training"] * BATCHES, "seam DescribedRichProgressBar (_get_train_description)"


class Validated(Tiny):
    """`Tiny` with a validation set, counting the validations run."""

    validations = 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.layer(batch)

    def on_validation_end(self) -> None:
        self.validations += 1

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(2, 2), batch_size=1)


def test_rewind_to_last_update_after_a_validation_keeps_the_logger_step(tmp_path):
    path, steps = tmp_path / "after-validation.ckpt", []

    def save_at_boundary(trainer, batch_idx):  # the validation after batch 3 (update 2) has run
        if batch_idx == 4:
            checkpoint = lightning_seams.dump_checkpoint(trainer)
            lightning_seams.rewind_to_last_update(checkpoint, 0, trainer.val_check_batch)
            trainer.strategy.save_checkpoint(checkpoint, path)

    record = Probe(lambda t, i: steps.append((i, lightning_seams.logger_step(t), t.global_step)))
    first = fit(tmp_path, Probe(save_at_boundary), module=Validated(), val_check_interval=4)
    resumed = fit(tmp_path, record, module=Validated(), ckpt_path=path, val_check_interval=4)
    message = "seam rewind_to_last_update (the checkpoint's 'loops' counters, a validation due)"
    assert (first.validations, resumed.validations) == (1, 0), f"{message}: the validation ran again on resume"
    assert steps == [(4, 2, 2)], f"{message}: (batch, logger step, global step) {steps}"


def test_step_progress_bar_counts_updates_through_the_public_hook(tmp_path, monkeypatch):
    """Once three private calls (`_initialize_train_progress_bar_id`, `_update`, `_update_metrics`): now the stock
    `on_train_batch_end`, told the updates done, so the bar shows updates out of `max_steps`, not micro-batches."""
    from protein_mlm.training import callbacks

    monkeypatch.setattr(callbacks, "stdout_is_terminal", lambda: True)
    bar, shown = callbacks.StepProgressBar(), []

    class Read(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            task = bar.progress.tasks[bar.train_progress_bar_id]
            shown.append((task.completed, task.total, task.description, bar.get_metrics(trainer, pl_module)["lr"]))

    module = Tiny()
    module.window = SimpleNamespace(latest=None)  # what the bar's metrics read from MaskedLMModule
    pl.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=3,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar, Read()],
    ).fit(module)
    done = [0, 1, 1, 2, 3]  # after each micro-batch; the epoch's last, partial window steps too
    assert [(d, total, text) for d, total, text, _ in shown] == [(d, 3, "Training") for d in done], "StepProgressBar"
    assert all(re.fullmatch(r"\d\.\d\de-0\d", lr) for *_, lr in shown), f"StepProgressBar's LR: {shown}"
