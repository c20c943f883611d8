"""The rows of scripts/benchmark.py: each trains one way for a timed window and returns its token counts.

HF rows (`run_hf`), this project's (`run_ours`) and a bare PyTorch loop (`run_bare`); scripts/benchmark.py runs each
in its own process and tabulates them.
"""

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCHMARK_WORK_DIR", ROOT / ".cache"))  # data cache and scratch output of the rows
OURS = {  # row -> overrides on top of the training config's defaults
    "ours": [],
    "ours_fp32": ["trainer.precision=32-true"],
    "ours_bf16": ["trainer.precision=bf16-mixed"],
    "ours_compile": ["model.compile=true"],
    "ours_eager": ["model.compile=false"],
    "ours_16k": ["data.max_tokens=16384"],
    "ours_packed": ["data.packing=true", "model.compile=false"],
    "ours_packed_compile": ["data.packing=true", "model.compile=true"],
    "ours_packed_fast": ["data.packing=true", "model.compile=true", "model.fast_layers=true"],
    "ours_eager_fast": ["model.compile=false", "model.fast_layers=true"],
}
HF = {  # row -> TrainingArguments that differ
    "hf": dict(bf16=False, train_sampling_strategy="random"),
    "hf_tuned": dict(bf16=True, train_sampling_strategy="group_by_length"),
}


def compose(model: str, max_length: int, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=[f"model={model}", f"data.max_length={max_length}", *overrides])


class Clock:
    """Counts real/padded tokens and squared lengths of each step's batch; times the steps after warm-up."""

    def __init__(self, warmup_steps: int, seconds: float):
        self.warmup_steps, self.seconds = warmup_steps, seconds
        self.batches: list[tuple[int, int, int]] = []  # (real, padded, sum of squared lengths) per batch served
        self.steps, self.start, self.elapsed = 0, None, 0.0

    def record_batch(self, attention_mask) -> None:
        lengths = attention_mask.sum(1)
        self.batches.append((int(lengths.sum()), attention_mask.numel(), int(lengths.square().sum())))

    def record_counts(self, counts) -> None:
        """Our batches carry their host-side counts (masking.BatchCounts)."""
        self.batches.append(tuple(counts))

    def step_done(self) -> bool:
        """Call after each optimizer step; True once the timed window is over."""
        import torch

        self.steps += 1
        if self.steps == self.warmup_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif self.start is not None and time.perf_counter() - self.start >= self.seconds:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.elapsed = time.perf_counter() - self.start
            return True
        return False

    def result(self) -> dict:
        timed = self.batches[self.warmup_steps : self.steps]  # batch i is consumed by step i (no accumulation)
        real, padded, squares = (sum(b[i] for b in timed) for i in range(3))
        return dict(steps=len(timed), seconds=self.elapsed, real=real, padded=padded, squares=squares)


def train_split(max_length: int):
    """The bundled training split (token ids without <cls>/<eos>), as the project caches it."""
    from protein_mlm.data.datamodule import ProteinDataModule

    datamodule = ProteinDataModule(max_length=max_length, cache_dir=str(WORK / "data"))
    datamodule.setup()
    return datamodule.splits["train"]


def run_hf(name: str, model_name: str, max_length: int, batch_size: int, clock: Clock) -> dict:
    """run_mlm.py's recipe: tokenizer truncation, DataCollatorForLanguageModeling, Trainer."""
    import datasets
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from protein_mlm.alphabet import CLS_ID, EOS_ID, load_tokenizer
    from protein_mlm.model.esm import build_model

    cfg = compose(model_name, max_length, [])
    model = build_model(dict(cfg.model.architecture))
    tokenizer = load_tokenizer()
    # What the tokenizer gives with truncation=True, max_length=max_length; built from the cached ids for speed.
    rows = train_split(max_length).with_format("numpy")["input_ids"]
    examples = datasets.Dataset.from_dict(
        {"input_ids": [[CLS_ID, *r[: max_length - 2].tolist(), EOS_ID] for r in rows]}
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    def collate(features):
        batch = collator(features)
        clock.record_batch(batch["attention_mask"])
        return batch

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = clock.step_done()

    args = TrainingArguments(
        output_dir=str(WORK / "benchmark-hf"),
        per_device_train_batch_size=batch_size,
        max_steps=10**7,
        learning_rate=4e-4,
        weight_decay=0.01,
        adam_beta2=0.98,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        **HF[name],
    )
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[StopAfter()]).train()
    return clock.result()


def run_ours(name: str, model_name: str, max_length: int, clock: Clock, extra: list[str]) -> dict:
    """This project's DataModule + LightningModule + Trainer, without checkpoints, validation or loggers."""
    import pytorch_lightning as pl

    from protein_mlm.data.masking import COUNTS_KEY
    from protein_mlm.preflight import check_config
    from protein_mlm.train import build_datamodule, build_module

    paths = [f"paths.cache_dir={WORK / 'data'}", f"paths.output_dir={WORK / 'benchmark-ours'}"]
    cfg = compose(model_name, max_length, [*OURS[name], *paths, *extra])
    plan = check_config(cfg)
    datamodule = build_datamodule(cfg, plan)
    module = build_module(cfg, plan)

    class StopAfter(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.record_counts(batch[COUNTS_KEY])

        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = clock.step_done()

    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=plan.precision,
        max_steps=10**7,
        accumulate_grad_batches=plan.accumulate,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StopAfter()],
    )
    trainer.fit(module, datamodule=datamodule)
    return clock.result()


def run_bare(model_name: str, max_length: int, clock: Clock, extra: list[str]) -> dict:
    """A bare PyTorch loop on ours' batches and model: the reference for the framework's overhead."""
    import torch

    from protein_mlm.data.masking import COUNTS_KEY, IGNORE_INDEX
    from protein_mlm.model.esm import build_model
    from protein_mlm.preflight import check_config
    from protein_mlm.training.schedules import lambda_scheduler

    paths = [f"paths.cache_dir={WORK / 'data'}", f"paths.output_dir={WORK / 'benchmark-bare'}"]
    cfg = compose(model_name, max_length, [*paths, *extra])
    plan = check_config(cfg)
    datamodule = instantiate_data(cfg, plan)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(dict(cfg.model.architecture)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optimizer.lr, betas=(0.9, 0.98), weight_decay=0.01, fused=True)
    scheduler = lambda_scheduler(optimizer, plan.schedule)
    bf16 = "bf16" in str(plan.precision)
    for batch in datamodule.train_dataloader():
        clock.record_counts(batch[COUNTS_KEY])
        ids, mask, labels = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = (
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            / labels.ne(IGNORE_INDEX).sum()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if clock.step_done():
            break
    return clock.result()


def instantiate_data(cfg, plan):
    """The training config's DataModule with padded batches (the bare loop feeds the model's own forward)."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, packing=False, num_workers=plan.num_workers)
    datamodule.setup()
    return datamodule
