"""LightningModule for masked-LM pretraining: loss, token-weighted metrics, optimizer and LR schedule."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch.optim import Optimizer
from torchmetrics import SumMetric

from .checkpoint import CHECKPOINT_FORMAT, FORMAT_KEY, load_pretrained_into
from .loader import POSITION_KEY
from .masking import IGNORE_INDEX
from .model import build_model
from .perf import flops_per_step
from .schedules import lambda_scheduler
from .tokenizer import PAD_ID


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


@dataclass
class UpdateStats:
    """One optimizer update, as device tensors: what the divergence guard and the logs read."""

    step: int  # the update's index (the LR monitor's step)
    loss: torch.Tensor  # token-weighted mean over the update's micro-batches and ranks: the optimised objective
    grad_norm: torch.Tensor  # global gradient norm after the rescale, before clipping
    tokens: torch.Tensor  # real (non-pad) tokens on this rank
    padded: torch.Tensor  # padded tokens on this rank
    squared_lengths: torch.Tensor  # sum of sequence lengths squared on this rank (attention FLOPs)


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
        inject_nan_at_step: int | None = None,
        init_from: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        peak_tflops: float | None = None,
    ):
        super().__init__()
        # Only plain containers go into the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "schedule"])
        self.model = build_model(architecture, activation_checkpointing=activation_checkpointing)
        if init_from:  # continue pretraining from a Hugging Face ESM directory (e.g. an export)
            load_pretrained_into(self.model, init_from)
        if compile:  # in place, so state_dict keys (and checkpoints) stay those of the plain model
            # dynamic: token-budget batches change shape every step; one dynamic graph beats a recompile each time
            for layer in self.model.esm.encoder.layer:  # one graph shared by all layers: compiles once
                layer.compile(dynamic=True)
        self._num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.optimizer_factory = optimizer
        self.schedule = schedule
        self.val_loss_sum, self.val_targets, self.val_correct = SumMetric(), SumMetric(), SumMetric()
        self.tokens_seen = 0  # real (non-pad) tokens trained on, kept across resumes
        self._window = [0.0, 0, 0, 0, 0]  # summed loss, targets, real tokens, padded tokens, sum of lengths^2
        self._micro_batches = 0  # micro-batches of the current update so far
        self._window_position: tuple[int, int] | None = None  # data position of the window's latest batch
        self.last_update: UpdateStats | None = None  # the last finished update, until it is logged
        self._last_step_time: float | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, vocab)

    def _masked_lm(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed loss over the masked positions, their count, and the logits."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        # Every position with ignore_index, no boolean-mask indexing (a host sync on a GPU); the cross-entropy
        # runs in fp32 even under bf16 autocast, since it is a sum over many small terms.
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, labels.ne(IGNORE_INDEX).sum(), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the summed token loss; `on_after_backward` turns the update's gradient into a token mean."""
        loss_sum, n_targets, _ = self._masked_lm(batch)
        if self.trainer.global_step == self.hparams.inject_nan_at_step:  # fault injection for tests
            loss_sum = loss_sum * float("nan")
        # Kept as tensors until the update ends, so a GPU syncs once per update, not per micro-batch.
        window = self._window
        window[0] += loss_sum.detach()
        window[1] += n_targets
        window[2] += batch["input_ids"].ne(PAD_ID).sum()
        window[3] += batch["input_ids"].numel()
        window[4] += batch["attention_mask"].sum(1).square().sum()  # attention FLOPs grow with length^2
        self._micro_batches += 1
        self._window_position = batch.get(POSITION_KEY)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, logger=False)
        return loss_sum

    def _ends_update(self) -> bool:
        """True on the micro-batch whose backward completes an optimizer update (Lightning then steps)."""
        if self._micro_batches >= self.trainer.accumulate_grad_batches:
            return True
        return self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # a finite epoch's last, partial window

    def on_after_backward(self) -> None:
        """At an update's last micro-batch: make the gradient that of (sum of token losses) / (targets), over
        all micro-batches and ranks (fairseq's and so ESM's objective), before anything reads or clips it."""
        if not self._ends_update():
            return
        loss_sum, targets = self._window[0], self._window[1]
        world = self.trainer.world_size
        if world > 1:  # one collective for both totals; DDP has already averaged the gradients over ranks
            totals = self.trainer.strategy.reduce(torch.stack([loss_sum, targets.to(loss_sum)]), reduce_op="sum")
            loss_sum, targets = totals[0], totals[1]
        # Lightning divided each micro-batch's loss by accumulate_grad_batches (also in a partial window), and
        # DDP divides by the world size: undo both and divide by the update's target count instead.
        scale = self.trainer.accumulate_grad_batches * world / targets.clamp(min=1)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0]))
        self.last_update = UpdateStats(
            step=self.trainer.global_step,
            loss=loss_sum / targets.clamp(min=1),
            grad_norm=self._gradient_norm(grads),
            tokens=self._window[2],
            padded=self._window[3],
            squared_lengths=self._window[4],
        )
        self._micro_batches = 0
        self._window = [0.0, 0, 0, 0, 0]
        self.tokens_seen += int(self.last_update.tokens)
        loader = self.trainer.train_dataloader
        if self._window_position is not None and hasattr(loader, "commit"):
            loader.commit(self._window_position)  # a checkpoint from now on resumes after this update's batches

    def _gradient_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global gradient norm (the one clipping uses); under fp16 with a loss scaler, unscaled."""
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Each rank holds a shard: the root module's norm is the global one (max_norm inf scales nothing).
            # Not exercised by the tests: Lightning's FSDP needs GPUs.
            return self.trainer.model.clip_grad_norm_(float("inf"))
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return norm / scaler.get_scale() if scaler is not None else norm

    def on_train_start(self) -> None:
        self._last_step_time = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log once per optimizer update, at the step index the update used (as the LR monitor does)."""
        update, self.last_update = self.last_update, None
        if update is None:
            return  # still accumulating gradients
        loss, grad_norm, tokens, padded, squared_lengths = (
            float(v) for v in (update.loss, update.grad_norm, update.tokens, update.padded, update.squared_lengths)
        )
        now = time.perf_counter()
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/tokens_seen": float(self.tokens_seen),
            "perf/padding_efficiency": tokens / max(padded, 1),  # real / padded tokens of this step's batches
        }
        if self._last_step_time is not None:  # per process; under DDP multiply by the world size
            seconds = max(now - self._last_step_time, 1e-9)
            metrics["perf/tokens_per_sec"] = tokens / seconds
            arch = self.hparams.architecture
            flops = flops_per_step(
                self._num_params, arch["num_hidden_layers"], arch["hidden_size"], tokens, squared_lengths
            )
            metrics["perf/tflops"] = flops / seconds / 1e12  # achieved model TFLOP/s (real tokens only)
            if self.hparams.peak_tflops:
                metrics["perf/mfu"] = metrics["perf/tflops"] / self.hparams.peak_tflops
        self._last_step_time = now
        self.log("loss", loss, prog_bar=True, logger=False)  # the progress bar's per-update loss
        for logger in self.loggers:
            logger.log_metrics(metrics, step=update.step)

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_loss_sum, self.val_targets, self.val_correct):
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_targets, logits = self._masked_lm(batch)
        labels = batch["labels"]
        self.val_loss_sum.update(loss_sum)
        self.val_targets.update(n_targets)
        self.val_correct.update((logits.argmax(-1).eq(labels) & labels.ne(IGNORE_INDEX)).sum())

    def on_validation_epoch_end(self) -> None:
        """Token-weighted over the whole validation set (not a mean of per-batch means)."""
        targets = self.val_targets.compute().clamp(min=1)
        loss = self.val_loss_sum.compute() / targets
        metrics = {
            "val/loss": loss,
            "val/perplexity": torch.exp(loss),
            "val/accuracy": self.val_correct.compute() / targets,
        }
        for name, value in metrics.items():  # for checkpointing and the progress bar
            self.log(name, value, prog_bar=name == "val/loss", logger=False)
        if not self.trainer.sanity_checking:  # to the loggers ourselves: Lightning would add an `epoch` series
            for logger in self.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=max(self.trainer.global_step - 1, 0))

    def on_validation_end(self) -> None:
        self._last_step_time = time.perf_counter()  # validation time is not training throughput

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
            if self.last_update is not None:
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self.last_update.grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen  # counted at updates only, like the data position
        checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
