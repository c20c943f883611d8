"""LightningModule for masked-LM pretraining: loss, token-weighted metrics, optimizer and LR schedule."""

import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch.optim import Optimizer
from torchmetrics import SumMetric

from .checkpoint import load_pretrained_into
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
        self._window = [0.0, 0, 0, 0, 0]  # loss * targets, targets, real tokens, padded tokens, sum of lengths^2
        self._last_step_time: float | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, vocab)

    def _masked_lm(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean loss over masked positions, their count, and how many were predicted right."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        targets = labels.ne(IGNORE_INDEX)
        n_targets = targets.sum()
        # Cross-entropy in fp32 even under bf16 autocast: it is a sum over many small terms.
        loss_sum = F.cross_entropy(logits[targets].float(), labels[targets], reduction="sum", ignore_index=IGNORE_INDEX)
        correct = (logits[targets].argmax(-1) == labels[targets]).sum()
        return loss_sum / n_targets.clamp(min=1), n_targets, correct

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_targets, _ = self._masked_lm(batch)
        if self.trainer.global_step == self.hparams.inject_nan_at_step:  # fault injection for tests
            loss = loss * float("nan")
        # Kept as tensors until the optimizer step, so a GPU syncs once per step, not per micro-batch.
        self._window[0] += loss.detach() * n_targets
        self._window[1] += n_targets
        self._window[2] += batch["input_ids"].ne(PAD_ID).sum()
        self._window[3] += batch["input_ids"].numel()
        self._window[4] += batch["attention_mask"].sum(1).square().sum()  # attention FLOPs grow with length^2
        self.log("loss", loss.detach(), prog_bar=True, logger=False)  # progress bar only; see below
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, logger=False)
        return loss

    def on_train_start(self) -> None:
        self._steps_logged = self.trainer.global_step
        self._last_step_time = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log once per optimizer step, at the step index the update used (as the LR monitor does)."""
        if self.trainer.global_step == self._steps_logged:
            return  # still accumulating gradients
        self._steps_logged = self.trainer.global_step
        loss_sum, targets, tokens, padded, squared_lengths = (float(v) for v in self._window)
        self._window = [0.0, 0, 0, 0, 0]
        tokens = int(tokens)
        self.tokens_seen += tokens
        now = time.perf_counter()
        metrics = {
            "train/loss": loss_sum / max(targets, 1),
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
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step - 1)

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_loss_sum, self.val_targets, self.val_correct):
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_targets, correct = self._masked_lm(batch)
        self.val_loss_sum.update(loss * n_targets)
        self.val_targets.update(n_targets)
        self.val_correct.update(correct)

    def on_validation_epoch_end(self) -> None:
        """Token-weighted over the whole validation set (not a mean of per-batch means)."""
        targets = self.val_targets.compute().clamp(min=1)
        loss = self.val_loss_sum.compute() / targets
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", torch.exp(loss))
        self.log("val/accuracy", self.val_correct.compute() / targets)

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
        with fp16's GradScaler the fused step unscales internally; bf16 has no scaler, so clipping is safe.
        """
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        no_scaler = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if by_norm and no_scaler and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning has no norm clipping under FSDP (Lightning #19235); the root FSDP module computes the
            # global norm over all shards itself. Not exercised by the tests: Lightning's FSDP needs GPUs.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        if by_norm and no_scaler and isinstance(self.trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
