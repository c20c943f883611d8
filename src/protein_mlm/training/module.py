"""LightningModule for masked-LM pretraining: loss, token-weighted metrics, optimizer and LR schedule."""

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch.optim import Optimizer

from protein_mlm.data.loader import POSITION_KEY, ResumableLoader, StreamLoader
from protein_mlm.data.masking import COUNTS_KEY
from protein_mlm.errors import TrainingDiverged
from protein_mlm.model.checkpoints import CHECKPOINT_FORMAT, CONTACT_HEAD_KEY, FORMAT_KEY, load_pretrained_into
from protein_mlm.model.esm import build_model
from protein_mlm.model.objective import MaskedLMTotals, batch_logits, masked_lm
from protein_mlm.training import lightning_seams
from protein_mlm.training.agreement import UpdateAgreement
from protein_mlm.training.schedules import lambda_scheduler
from protein_mlm.training.updates import UpdateRecord, UpdateWindow


def parameter_groups(model: torch.nn.Module, no_decay_bias_and_norm: bool) -> list[dict[str, Any]]:
    """Trainable parameters; optionally biases and LayerNorm weights in a group without weight decay.

    fairseq (and so ESM) decays every parameter; the option follows BERT/HF practice. Groups get a
    `name`, so the LR monitor logs `<scheduler name>/decay` and `/no_decay` rather than `/pg1`, `/pg2`.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_bias_and_norm:
        return [{"params": [p for _, p in trainable]}]
    exempt = [p for n, p in trainable if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n]
    exempt_ids = {id(p) for p in exempt}
    decay = [p for _, p in trainable if id(p) not in exempt_ids]
    return [{"params": decay, "name": "decay"}, {"params": exempt, "name": "no_decay", "weight_decay": 0.0}]


class MaskedLMModule(pl.LightningModule):
    """ESM masked-LM training; everything it is built from is a plain Python object."""

    def __init__(
        self,
        architecture: dict[str, Any],
        optimizer: Callable[..., Optimizer] | None = None,
        schedule: Callable[[int], float] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
        no_decay_bias_and_norm: bool = False,
        run_config: dict[str, Any] | None = None,
        init_from: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        static_shapes: bool = False,
        fast_layers: bool = False,
        inject_nan_at_step: int | None = None,
        loss_divisor: float = 1.0,
    ):
        super().__init__()
        # Only plain containers go into the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "schedule", "inject_nan_at_step"])
        self.inject_nan_at_step = inject_nan_at_step  # faults.inject_nan_at_step: make this update NaN (tests)
        self.loss_divisor = loss_divisor  # RunPlan.loss_divisor: the back-propagated loss is loss_sum / this
        self.model = build_model(
            architecture, activation_checkpointing=activation_checkpointing, fast_layers=fast_layers
        )
        self.contact_head_trained = False  # MLM never trains it; only weights it starts from can bring a fitted one
        if init_from:  # continue pretraining from a Hugging Face ESM directory (e.g. an export)
            self.contact_head_trained = load_pretrained_into(self.model, init_from)
        if compile:  # in place, so state_dict keys (and checkpoints) stay those of the plain model
            # Token-budget batches change shape every step: one dynamic graph beats a recompile each time. Packed
            # batches have one shape: a static graph, compiled once (other shapes, e.g. validation, add one more).
            for layer in self.model.esm.encoder.layer:  # one graph shared by all layers
                layer.compile(dynamic=None if static_shapes else True)
        self.num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.optimizer_factory = optimizer
        self.schedule = schedule
        self.val_totals = MaskedLMTotals()
        self.window = UpdateWindow()  # the open update and the finished ones, read once per logging interval
        self.window.subscribe(self._log_updates)
        self._clip_norm: torch.Tensor | None = None  # this update's gradient norm, for clipping
        self.agreement = UpdateAgreement()  # under DDP: each update's totals and stop votes, in one collective
        self.stop_signal: int | None = None  # the stop signal this rank got (set by callbacks.ResumeCheckpoint)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, vocab)

    def batch_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits of a padded batch, or of a packed one (packing.py)."""
        return batch_logits(self.model, batch)

    def _masked_lm(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed loss over the masked positions, their count, and the logits (model/objective.py)."""
        return masked_lm(self.model, batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Returns the summed token loss over `loss_divisor` (fp16: about a token mean, so the loss scaler's gradients
        stay finite); `on_after_backward` turns the update's gradient into the exact token mean."""
        loss_sum, n_targets, _ = self._masked_lm(batch)
        self.window.add(loss_sum, n_targets, batch[COUNTS_KEY], batch.get(POSITION_KEY))
        if self.trainer.world_size > 1 and self._ends_update():
            # Both totals are known before the backward: their one all-reduce runs while it does.
            self._totals = self.agreement.start(*self.window.totals(), self.stop_signal, self.window.tokens)
        return loss_sum / self.loss_divisor if self.loss_divisor != 1 else loss_sum

    def _ends_update(self) -> bool:
        """True on the micro-batch whose backward completes an optimizer update (Lightning then steps)."""
        if self.window.pending >= self.trainer.accumulate_grad_batches:
            return True
        return lightning_seams.is_last_batch(self.trainer)  # a finite epoch's last, partial window

    def on_after_backward(self) -> None:
        """At an update's last micro-batch: make the gradient that of (sum of token losses) / (targets), over
        all micro-batches and ranks (fairseq's and so ESM's objective), before anything reads or clips it."""
        if not self._ends_update():
            return
        loss_sum, targets = self.window.totals()
        world, all_tokens = self.trainer.world_size, None  # None: this rank's tokens are all there are
        if world > 1:  # the rescale needs the totals of all ranks: wait for training_step's all-reduce here
            loss_sum, targets, all_tokens = self.agreement.finish(self._totals, self.trainer.global_step)
        if self.trainer.global_step == self.inject_nan_at_step:
            loss_sum = self._make_nan(loss_sum)
        # Lightning divided each micro-batch's loss by accumulate_grad_batches (also in a partial window), DDP
        # divides by the world size and training_step by loss_divisor: undo all three and divide by the update's
        # target count instead.
        scale = self.trainer.accumulate_grad_batches * world * self.loss_divisor / targets.clamp(min=1)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0]))
        loss, self._clip_norm = loss_sum / targets.clamp(min=1), self._gradient_norm(grads)
        self._skip_if_not_finite(loss, self._clip_norm)
        position = self.window.end(self.trainer.global_step, loss, self._clip_norm, all_tokens)
        loader = self.trainer.train_dataloader
        if position is not None and isinstance(loader, ResumableLoader | StreamLoader):
            loader.commit(position)  # a checkpoint from now on resumes after this update's batches

    def _make_nan(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """`faults.inject_nan_at_step`: this update's gradients and loss become NaN, to exercise the skip and guard."""
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.fill_(float("nan"))
        return loss_sum * float("nan")

    def _skip_if_not_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Keep a non-finite update out of the weights, without a host read where the optimizer allows it.

        A fused optimizer takes a device flag (`found_inf`, as from a loss scaler) and skips the step on the
        device; the divergence guard then stops the run when it reads the update. Other optimizers need the flag
        on the host: one sync per update. Under fp16 the loss scaler does this itself.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        not_finite = ~(torch.isfinite(loss) & torch.isfinite(norm))
        optimizer = self.trainer.optimizers[0]
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = not_finite.float()
        elif bool(not_finite):
            raise TrainingDiverged(self.trainer.global_step, f"loss is {float(loss)}, gradient norm {float(norm)}")

    def _gradient_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global gradient norm (the one clipping uses); under fp16 with a loss scaler, unscaled."""
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Each rank holds a shard: the root module's norm is the global one (max_norm inf scales nothing).
            # Not exercised by the tests: Lightning's FSDP needs GPUs.
            return self.trainer.model.clip_grad_norm_(float("inf"))
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None:
            return norm
        scale = scaler._get_scale_async()  # the device tensor: `get_scale()` would read it to the host every update
        return norm / (scale if scale is not None else scaler.get_scale())

    def on_train_start(self) -> None:
        self.window.subscribe(every_n_steps=self.trainer.log_every_n_steps)  # the loggers' interval
        self.window.last_step = max(self.trainer.max_steps, 0)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Read the finished updates when the window says an update is due: at the same update on every rank (the
        guard raises on all of them alike), before any callback's batch-end hook."""
        if self.window.due(self.trainer.global_step + 1):
            self.window.read()

    def on_validation_start(self) -> None:
        self.window.read()  # the training numbers before the validation's

    def on_train_end(self) -> None:
        self.window.read()

    def _log_updates(self, records: list[UpdateRecord]) -> None:
        """Every update at its own step, as the LR monitor logs its LR."""
        for record in records:
            metrics = {
                "train/loss": record.loss,
                "train/grad_norm": record.grad_norm,
                "train/tokens_seen": float(record.tokens_seen),
                "perf/padding_efficiency": record.tokens / max(record.padded, 1),  # real / padded tokens
            }
            for logger in self.loggers:
                logger.log_metrics(metrics, step=record.step)

    def on_validation_epoch_start(self) -> None:
        self.val_totals.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_totals.update(*self._masked_lm(batch), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        """Token-weighted over the whole validation set (not a mean of per-batch means)."""
        metrics = self.val_totals.compute()
        for name, value in metrics.items():  # for checkpointing and the progress bar
            self.log(name, value, prog_bar=name == "val/loss", logger=False)
        if not self.trainer.sanity_checking:  # to the loggers ourselves: Lightning would add an `epoch` series
            for logger in self.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=max(self.trainer.global_step - 1, 0))

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("MaskedLMModule was built without an optimizer; pass optimizer=partial(...)")
        groups = parameter_groups(self.model, self.hparams.no_decay_bias_and_norm)
        optimizer = self.optimizer_factory(groups)
        if self.schedule is None:
            return optimizer
        # Steps come from the config, never trainer.estimated_stepping_batches (Lightning #20550).
        scheduler = {"scheduler": lambda_scheduler(optimizer, self.schedule), **(self.hparams.lr_scheduler or {})}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip the global norm ourselves when no loss scaler is in play (fp32, bf16-mixed): one device, DDP, FSDP.

        Lightning refuses to clip for a fused optimizer under any mixed-precision plugin, bf16 included, because
        with fp16's GradScaler the fused step unscales internally; bf16 has no scaler, so clipping is safe. The
        norm is the one `on_after_backward` computed for this update, not a second pass over the gradients.
        """
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        no_scaler = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if by_norm and no_scaler and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning has no norm clipping under FSDP (Lightning #19235); the root FSDP module computes the
            # global norm over all shards itself. Not exercised by the tests: Lightning's FSDP needs GPUs.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        if by_norm and no_scaler and isinstance(self.trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if self._clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._clip_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.window.read()  # tokens_seen is known up to the last read update (nothing is unread at a resume save)
        checkpoint["tokens_seen"] = self.window.tokens_seen  # all ranks' tokens, at updates only, like the position
        checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT
        checkpoint[CONTACT_HEAD_KEY] = self.contact_head_trained  # provenance for inference (contacts or not)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.window.tokens_seen = checkpoint.get("tokens_seen", 0)
