"""The GPU checks, in order of value, each result written to --out as soon as it is measured (one run, < 8 min).

    python scripts/gpu_checks.py --out $OUT            # on the GPU machine (see docs/performance.md for setup)
    python scripts/gpu_checks.py --out /tmp/x --quick  # the same code paths on a CPU with the tiny model

1. sync: 20 packed training steps through Trainer.fit with `torch.cuda.set_sync_debug_mode("error")` on every
   step that does not read the logs: any host sync there raises, and its traceback is the result.
2. bench: scripts/benchmark.py rows ours_packed and ours_packed_compile for esm2_650m, then esm2_150m, at the
   largest token budget that fits (MFU from per-sequence sum of n^2, peak memory, warm-up incl. compile time).
3. attention: bf16 varlen flash attention vs the block-diagonal reference path, forward and backward.
4. fsdp: trainer=fsdp on one GPU for 20 steps with a checkpoint, a resume to 30 steps, an HF export.
5. loss: 100 steps packed + compiled vs eager padded: the last 20 steps' mean loss within 5e-3 relative.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write(out: Path, name: str, result) -> None:
    (out / name).write_text(result if isinstance(result, str) else json.dumps(result, indent=1))
    print(f"== {name}: {str(result)[:400]}", flush=True)


def train_cli(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], capture_output=True, text=True, timeout=timeout
    )


def check_sync(out: Path, quick: bool) -> None:
    """Every non-logging step free of host syncs: set_sync_debug_mode('error') raises at the first one."""
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from protein_mlm.train import train

    class SyncGuard(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            logging_step = (trainer.global_step + 1) % trainer.log_every_n_steps == 0
            if torch.cuda.is_available() and trainer.global_step >= 2 and not logging_step:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, *args):
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")

    model = "tiny" if quick else "esm2_150m"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", "data.packing=true", "trainer.max_steps=20"])
    with open_dict(cfg):
        cfg.trainer.log_every_n_steps = 10
        cfg.trainer.val_check_interval = 1000
        cfg.callbacks.progress_bar = None
        cfg.paths.output_dir = str(out / "sync-run")
        cfg.paths.cache_dir = str(ROOT / ".cache" / "data")
    trainer_init = pl.Trainer.__init__

    def with_guard(self, *args, callbacks=None, **kwargs):
        trainer_init(self, *args, callbacks=[*(callbacks or []), SyncGuard()], **kwargs)

    pl.Trainer.__init__ = with_guard
    try:
        train(cfg)
        write(out, "1-sync.txt", "ok: no host sync on the non-logging steps of 20 packed updates")
    except Exception:
        write(out, "1-sync.txt", traceback.format_exc()[-6000:])
    finally:
        pl.Trainer.__init__ = trainer_init


def check_bench(out: Path, quick: bool) -> None:
    """Packed rows, eager and compiled, at token budgets sized from the earlier peak (650M: 48 GiB at 16k)."""
    runs = [("tiny", 4096)] if quick else [("esm2_650m", 40960), ("esm2_150m", 65536)]
    for model, tokens in runs:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "benchmark.py"),
                f"--model={model}",
                "--rows=ours_packed,ours_packed_compile",
                f"--seconds={5 if quick else 25}",
                "--warmup-steps=3" if quick else "--warmup-steps=6",
                "--max-length=1024",
                f"--out={out / f'2-bench-{model}.md'}",
                "--set",
                f"data.max_tokens={tokens}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode:
            write(out, f"2-bench-{model}-error.txt", result.stderr[-4000:])


def check_attention(out: Path, quick: bool) -> None:
    """bf16 varlen flash attention against the block-diagonal reference, values and gradients."""
    import torch

    from protein_mlm.attention import _varlen_function, block_diagonal_attention, varlen_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or _varlen_function() is None:
        write(out, "3-attention.json", {"skipped": f"device {device}, varlen {_varlen_function() is not None}"})
        return
    torch.manual_seed(0)
    lengths = [1, 37, 300, 1024, 500, 186, 2048 - 1 - 37 - 300 - 1024 - 500 - 186]
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    q, k, v = (torch.randn(1, 20, 2048, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    results = {}
    outputs = {}
    for name, fn in (
        ("varlen", lambda: varlen_attention(q * 0.125, k, v, cu, 1024, 1.0)),
        ("reference", lambda: block_diagonal_attention(q * 0.125, k, v, segment_ids, 1.0)),
    ):
        o = fn()
        o.float().square().sum().backward()
        outputs[name] = (o.detach().float(), q.grad.float().clone())
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn().float().square().sum().backward()
        torch.cuda.synchronize()
        results[f"{name}_ms_fwd_bwd"] = (time.perf_counter() - start) * 100
    (o1, g1), (o2, g2) = outputs["varlen"], outputs["reference"]
    results["max_abs_out"] = (o1 - o2).abs().max().item()
    results["max_rel_grad"] = ((g1 - g2).abs().max() / g2.abs().max()).item()
    write(out, "3-attention.json", results)


def check_fsdp(out: Path, quick: bool) -> None:
    """trainer=fsdp on one GPU: 20 steps with a checkpoint, a resume to 30, an HF export that loads."""
    run_dir = out / "fsdp-run"
    common = ["experiment=smoke", "trainer.max_steps=20", "trainer.val_check_interval=10", f"hydra.run.dir={run_dir}"]
    strategy = ["trainer=cpu"] if quick else ["trainer=fsdp", "trainer.devices=1"]
    log = []
    first = train_cli(*common, *strategy)
    log.append(f"first: exit {first.returncode} {first.stderr[-1500:]}")
    second = train_cli(f"resume={run_dir}", "trainer.max_steps=30")
    log.append(f"resume: exit {second.returncode} {second.stderr[-1500:]}")
    export = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_hf.py"), str(run_dir), str(out / "fsdp-export")],
        capture_output=True,
        text=True,
    )
    log.append(f"export: exit {export.returncode} {export.stdout[-300:]} {export.stderr[-1500:]}")
    if export.returncode == 0:
        from transformers import EsmForMaskedLM

        model = EsmForMaskedLM.from_pretrained(out / "fsdp-export")
        log.append(f"loaded: {sum(p.numel() for p in model.parameters())} parameters")
    write(out, "4-fsdp.txt", "\n".join(log))


def check_loss(out: Path, quick: bool) -> None:
    """Packed + compiled vs eager padded, same seed and schedule: mean loss of the last 20 of 100 steps."""
    from protein_mlm.tblog import read_scalars

    steps = 30 if quick else 100
    model = "model=tiny" if quick else "model=esm2_35m"
    base = [model, f"trainer.max_steps={steps}", "trainer.val_check_interval=1000"]
    means = {}
    for name, extra in (("padded", []), ("packed_compiled", ["data.packing=true", "model.compile=true"])):
        run_dir = out / f"loss-{name}"
        result = train_cli(*base, *extra, f"hydra.run.dir={run_dir}", timeout=400)
        if result.returncode:
            write(out, f"5-loss-{name}-error.txt", result.stderr[-3000:])
            return
        losses = dict(read_scalars(run_dir)["train/loss"])
        means[name] = sum(losses[s] for s in range(steps - 20, steps)) / 20
    means["relative_difference"] = abs(means["packed_compiled"] - means["padded"]) / means["padded"]
    write(out, "5-loss.json", means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="tiny models, short runs (checks the script on a CPU)")
    parser.add_argument("--only", default="sync,bench,attention,fsdp,loss", help="comma-separated checks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checks = {"sync": check_sync, "bench": check_bench, "attention": check_attention, "fsdp": check_fsdp}
    checks["loss"] = check_loss
    for name in args.only.split(","):
        start = time.perf_counter()
        try:
            checks[name](args.out, args.quick)
        except Exception:
            write(args.out, f"{name}-crash.txt", traceback.format_exc()[-4000:])
        print(f"   ({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
