"""The GPU checks as a gate: one command, an overall deadline, a time budget per check, checks in order of value.

    python scripts/gpu_checks.py --out $OUT            # on the GPU machine (scripts/gpu_setup.sh run $OUT)
    python scripts/gpu_checks.py --out /tmp/x --quick  # the same code on a CPU with the tiny model

Each result is appended to OUT/summary.md as soon as it is measured: check, measured, threshold, pass/fail, under a
header with the torch / transformers / Lightning / CUDA versions and the attention path packed batches take.
1. sync: packed esm2_150m updates through Trainer.fit with `set_sync_debug_mode("error")` on non-logging steps.
2. attention: training-shaped cu_seqlens from collate_packed (row tails, bucket) through varlen flash vs the
   block-diagonal reference (values, gradients zeroed between paths), and its time vs the same tokens in compact
   segments (no bucket, exact max_seqlen).
3. throughput: scripts/benchmark.py rows, esm2_150m ours_packed compiled, hf_tuned, ours_packed eager, then
   esm2_650m compiled and hf_tuned; MFU and x hf_tuned, compiled-graph counts.
4. loss: packed eager vs packed compiled on identical batches: mean loss of steps 31-50 within 2e-3 relative.
5. fsdp: trainer=fsdp on the one GPU vs trainer=gpu: the first 10 losses within 1e-2 relative.
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
TARGET_MFU = {"esm2_150m": 0.25, "esm2_650m": 0.40}  # issue targets on an H200
TARGET_X_HF = {"esm2_150m": 2.5, "esm2_650m": 2.0}


class Summary:
    """OUT/summary.md, one table row appended per result (a run cut short keeps what it measured)."""

    def __init__(self, out: Path, header: list[str]):
        self.path = out / "summary.md"
        self.path.write_text(
            "\n".join([*header, "", "| check | measured | threshold | result |", "|---|---|---|---|", ""])
        )

    def add(self, check: str, measured: str, threshold: str, passed: bool | None) -> None:
        verdict = {True: "pass", False: "**FAIL**", None: "info"}[passed]
        with self.path.open("a") as f:
            f.write(f"| {check} | {measured} | {threshold} | {verdict} |\n")
        print(f"== {check}: {measured} [{threshold}] {verdict}", flush=True)


def header(quick: bool) -> list[str]:
    """Versions and the attention path, first in the summary."""
    import pytorch_lightning
    import torch
    import transformers

    from protein_mlm.model import attention

    cuda = torch.version.cuda if torch.cuda.is_available() else "none"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if torch.cuda.is_available():
        probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
        kernel = attention.varlen_kernel(probe, probe)
        path = f"varlen flash ({kernel.__module__}.{kernel.__name__})" if kernel else "block-diagonal SDPA reference"
    else:
        path = "block-diagonal SDPA reference (CPU)"
    return [
        f"# GPU checks{' (--quick, CPU)' if quick else ''}: {device}",
        "",
        f"torch {torch.__version__}, CUDA {cuda}, transformers {transformers.__version__}, "
        f"Lightning {pytorch_lightning.__version__}; packed attention: {path}",
        f"Command: `python scripts/gpu_checks.py {' '.join(sys.argv[1:])}`",
    ]


def run_child(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A Python child with a hard time limit (a hung check costs its budget, not the run)."""
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as e:
        stdout, stderr = (x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        return subprocess.CompletedProcess(args, 124, stdout, f"{stderr[-2000:]}\ntimed out after {timeout:.0f} s")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def check_sync(summary: Summary, quick: bool, budget: float) -> None:
    """No host sync on the non-logging steps of 20 packed updates (in a child, under the budget)."""
    result = run_child([__file__, "--inner", "sync", *(["--quick"] if quick else [])], budget)
    ok = result.returncode == 0 and "SYNC-OK" in result.stdout
    measured = "no sync on non-logging steps" if ok else last_line(result.stderr + result.stdout)
    summary.add("sync (20 packed updates, esm2_150m)", measured, "0 syncs", ok if not quick else None)


def inner_sync(quick: bool) -> None:
    import pytorch_lightning as pl
    import torch
    from omegaconf import open_dict

    from protein_mlm.preflight import check_config
    from protein_mlm.train import train

    class SyncGuard(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            logging_step = (trainer.global_step + 1) % trainer.log_every_n_steps == 0
            if torch.cuda.is_available() and trainer.global_step >= 2 and not logging_step:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, *args):
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")

        def on_train_end(self, trainer, pl_module):
            print("SYNC-OK", flush=True)  # every step ran under the guard (checkpoints and summary still follow)

    cfg = compose(
        "tiny" if quick else "esm2_150m",
        ["data.packing=true", "trainer.max_steps=20", "model.compile=false", "trainer.val_check_interval=1000"],
    )
    with open_dict(cfg):
        cfg.trainer.log_every_n_steps = 10
        cfg.callbacks.progress_bar = None
        cfg.paths.output_dir = str(Path(os.environ["GPU_CHECKS_OUT"]) / "sync-run")
    check_config(cfg)
    trainer_init = pl.Trainer.__init__

    def with_guard(self, *args, callbacks=None, **kwargs):
        trainer_init(self, *args, callbacks=[*(callbacks or []), SyncGuard()], **kwargs)

    pl.Trainer.__init__ = with_guard
    train(cfg)


def compose(model: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    cache = f"paths.cache_dir={ROOT / '.cache' / 'data'}"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=[f"model={model}", cache, *overrides])


def training_shaped_batch(rows: int, row_tokens: int, seed: int = 0):
    """A packed batch as training makes it: sequences of bundled-like lengths, row tails, the segment bucket."""
    import numpy as np

    from protein_mlm.data.masking import mask_tokens
    from protein_mlm.data.packing import best_fit_rows, collate_packed

    rng = np.random.default_rng(seed)
    residues = np.clip(rng.lognormal(5.7, 0.6, size=rows * 8), 30, row_tokens - 2).astype(int)
    keep = sorted({p for row in best_fit_rows((residues + 2).tolist(), rows, row_tokens) for p in row})
    return collate_packed([mask_tokens(rng.integers(4, 24, size=n), rng) for n in residues[keep]], rows, row_tokens)


def check_attention(summary: Summary, quick: bool, budget: float) -> None:
    """varlen flash on a training-shaped batch: values and gradients vs the reference, time vs compact segments."""
    import torch

    from protein_mlm.model import attention

    if not torch.cuda.is_available():
        summary.add("attention", "skipped: no CUDA", "-", None)
        return
    rows, row_tokens, heads, dim = 64, 1024, 20, 32  # esm2_150m's heads at 65,536 tokens
    batch = training_shaped_batch(rows, row_tokens)
    cu, segment_ids = batch["cu_seqlens"].cuda(), batch["segment_ids"].cuda()
    sizes = cu.diff()
    compact = torch.cat([cu[:1], cu[1:][sizes > 0]])  # the same tokens, no empty segments
    exact_max = int(sizes.max())
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, heads, row_tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for x in (q, k, v):
        x.requires_grad_(True)
    scale = dim**-0.5
    paths = {
        "training": lambda: attention.varlen_attention(q, k, v, cu, row_tokens, scale),
        "compact": lambda: attention.varlen_attention(q, k, v, compact, exact_max, scale),
        "reference": lambda: attention.block_diagonal_attention(q, k, v, segment_ids, scale),
    }
    grads, outputs, times = {}, {}, {}
    for name, fn in paths.items():
        out = fn()
        out.float().square().sum().backward()
        outputs[name], grads[name] = out.detach().float(), [x.grad.float().clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn().float().square().sum().backward()
            for x in (q, k, v):
                x.grad = None
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) * 100  # ms per forward + backward
    ref_out, ref_grads = outputs["reference"], grads["reference"]
    out_err = ((outputs["training"] - ref_out).abs().max() / ref_out.abs().max()).item()
    grad_err = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads["training"], ref_grads))
    segments = f"{len(cu) - 1} segments ({len(compact) - 1} real)"
    summary.add("attention values vs reference (bf16, rel. to max)", f"{out_err:.2e}", "<= 1e-2", out_err <= 1e-2)
    summary.add("attention gradients vs reference (bf16)", f"{grad_err:.2e}", "<= 2e-2", grad_err <= 2e-2)
    ratio = times["training"] / times["compact"]
    summary.add(
        "attention time, training-shaped vs compact",
        f"{times['training']:.2f} vs {times['compact']:.2f} ms = {ratio:.2f}x; {segments}; reference "
        f"{times['reference']:.2f} ms",
        "<= 1.3x",
        ratio <= 1.3,
    )


def benchmark(model: str, rows: str, tokens: int, batch_size: int, quick: bool, out: Path, budget: float) -> dict:
    """scripts/benchmark.py rows (each its own process); their JSON results, or an error."""
    json_path = out / f"bench-{model}.json"
    args = [
        str(ROOT / "scripts" / "benchmark.py"),
        f"--model={model}",
        f"--rows={rows}",
        f"--seconds={3 if quick else 8}",
        f"--warmup-steps={2 if quick else 3}",
        "--max-length=1024" if not quick else "--max-length=128",
        f"--batch-size={batch_size}",
        f"--out={out / f'bench-{model}.md'}",
        "--set",
        f"data.max_tokens={tokens}",
    ]
    result = run_child(args, budget)
    if not json_path.is_file():
        return {"error": last_line(result.stderr) or f"exit {result.returncode}"}
    return json.loads(json_path.read_text())


def check_throughput(summary: Summary, quick: bool, budget: float, out: Path) -> None:
    """MFU and speed-up over hf_tuned per model; compiled-graph counts per row."""
    from protein_mlm.model.perf import flops_per_step

    plans = [("tiny", 4096, 16)] if quick else [("esm2_150m", 65536, 64), ("esm2_650m", 40960, 32)]
    rows = {"esm2_150m": "ours_packed_compile,hf_tuned,ours_packed", "esm2_650m": "ours_packed_compile,hf_tuned"}
    deadline = time.monotonic() + budget
    for model, tokens, batch_size in plans:
        left = deadline - time.monotonic()
        if left < 30:
            summary.add(f"throughput {model}", "skipped: out of time", "-", None)
            continue
        data = benchmark(model, rows.get(model, "ours_packed_compile,hf_tuned"), tokens, batch_size, quick, out, left)
        if "error" in data:
            summary.add(f"throughput {model}", f"failed: {data['error']}", "-", False)
            continue
        arch = dict(compose(model, []).model.architecture)
        from protein_mlm.model.esm import build_model

        params = sum(p.numel() for p in build_model(arch, device="meta").parameters() if p.requires_grad)
        hf = data["rows"].get("hf_tuned", {}).get("real_per_s")
        for row, r in data["rows"].items():
            if "error" in r:
                summary.add(f"{model} {row}", f"failed: {r['error']}", "-", False)
                continue
            peak = data["peaks"].get("32-true" if row == "hf" else "bf16-mixed") or 0
            flops = flops_per_step(params, arch["num_hidden_layers"], arch["hidden_size"], r["real"], r["squares"])
            mfu = flops / r["seconds"] / (peak * 1e12) if peak else 0.0
            x_hf = f", {r['real_per_s'] / hf:.2f}x hf_tuned" if hf and row != "hf_tuned" else ""
            graphs = f", {r.get('graphs', 0)} graphs / {r.get('graph_breaks', 0)} breaks"
            measured = (
                f"{r['real_per_s']:,.0f} real tok/s, MFU {mfu:.1%}{x_hf}{graphs}, {r['peak_gpu_gib'] or 0:.0f} GiB"
            )
            if row == "ours_packed_compile" and model in TARGET_MFU and hf:
                target = f"MFU >= {TARGET_MFU[model]:.0%}, >= {TARGET_X_HF[model]}x hf_tuned"
                passed = mfu >= TARGET_MFU[model] and r["real_per_s"] / hf >= TARGET_X_HF[model]
                summary.add(f"throughput {model} {row}", measured, target, passed)
            else:
                summary.add(f"throughput {model} {row}", measured, "-", None)


def check_loss(summary: Summary, quick: bool, budget: float) -> None:
    """Packed eager vs packed compiled, identical batches (same seed and data): steps 31-50 mean loss."""
    result = run_child([__file__, "--inner", "loss", *(["--quick"] if quick else [])], budget)
    line = next((x for x in result.stdout.splitlines() if x.startswith("LOSS ")), None)
    if line is None:
        summary.add("loss: packed eager vs compiled", f"failed: {last_line(result.stderr)}", "<= 2e-3 rel.", False)
        return
    means = json.loads(line[5:])
    diff = abs(means["compiled"] - means["eager"]) / means["eager"]
    measured = f"{means['eager']:.4f} vs {means['compiled']:.4f} (rel. {diff:.1e}), {means['graphs']} graphs"
    summary.add("loss: packed eager vs compiled, steps 31-50", measured, "<= 2e-3 rel.", diff <= 2e-3)


def inner_loss(quick: bool) -> None:
    from omegaconf import open_dict
    from torch._dynamo.utils import counters

    from protein_mlm.reporting.tblog import read_scalars
    from protein_mlm.train import train

    means, steps = {}, 30 if quick else 50  # --quick: steps 11-30 (a CPU compiles and trains slowly)
    for name, compile in (("eager", "false"), ("compiled", "true")):
        cfg = compose(
            "tiny" if quick else "esm2_8m",
            [
                "data.packing=true",
                "data.max_tokens=16384" if not quick else "data.max_tokens=2048",
                f"trainer.max_steps={steps}",
                "trainer.val_check_interval=1000",
                f"model.compile={compile}",
                "print_config=false",
                "callbacks.model_checkpoint=null",
            ],
        )
        run_dir = Path(os.environ["GPU_CHECKS_OUT"]) / f"loss-{name}"
        with open_dict(cfg):
            cfg.callbacks.progress_bar = None
            cfg.paths.output_dir = str(run_dir)
        train(cfg)
        losses = dict(read_scalars(run_dir)["train/loss"])
        means[name] = sum(losses[s] for s in range(steps - 20, steps)) / 20
        means["graphs"] = counters["stats"]["unique_graphs"]
    print("LOSS " + json.dumps(means), flush=True)


def check_fsdp(summary: Summary, quick: bool, budget: float, out: Path) -> None:
    """trainer=fsdp on one GPU against trainer=gpu: the same first 10 losses (the sharded step is the plain one)."""
    from protein_mlm.reporting.tblog import read_scalars

    if quick:
        summary.add("fsdp", "skipped: Lightning's FSDP needs a GPU", "-", None)
        return
    losses = {}
    for name in ("gpu", "fsdp"):
        run_dir = out / f"fsdp-{name}"
        overrides = ["experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=10", "data.packing=false"]
        overrides.append(f"paths.cache_dir={ROOT / '.cache' / 'data'}")  # tokenized once, by the earlier checks
        result = run_child(
            [str(ROOT / "train.py"), *overrides, f"trainer={name}", "trainer.devices=1", f"hydra.run.dir={run_dir}"],
            budget / 2,
        )
        if result.returncode:
            summary.add(f"fsdp: trainer={name}", f"failed: {last_line(result.stderr)}", "exit 0", False)
            return
        losses[name] = [v for _, v in sorted(read_scalars(run_dir)["train/loss"])][:10]
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["fsdp"], losses["gpu"]))
    summary.add("fsdp vs gpu: first 10 losses", f"max rel. diff {diff:.1e}", "<= 1e-2", diff <= 1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for summary.md and the raw results")
    parser.add_argument("--quick", action="store_true", help="tiny models, short runs (checks the script on a CPU)")
    parser.add_argument("--deadline", type=float, default=460, help="seconds for all checks; later ones are skipped")
    parser.add_argument("--only", default="sync,attention,throughput,loss,fsdp", help="comma-separated checks")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # internal: one check's work in a child process
    args = parser.parse_args()
    if args.inner:
        return {"sync": inner_sync, "loss": inner_loss}[args.inner](args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["GPU_CHECKS_OUT"] = str(args.out.resolve())
    # Seconds at most; measured on an H200 (2026-12-04): sync 62, attention 3, five throughput rows ~370, loss ~75.
    budgets = {"sync": 75, "attention": 30, "throughput": 330, "loss": 90, "fsdp": 70}
    if args.quick:
        budgets = {k: v * 3 for k, v in budgets.items()}  # a 2-core CPU compiles and trains slower
    checks = {
        "sync": lambda b: check_sync(summary, args.quick, b),
        "attention": lambda b: check_attention(summary, args.quick, b),
        "throughput": lambda b: check_throughput(summary, args.quick, b, args.out),
        "loss": lambda b: check_loss(summary, args.quick, b),
        "fsdp": lambda b: check_fsdp(summary, args.quick, b, args.out),
    }
    summary = Summary(args.out, header(args.quick))
    deadline = time.monotonic() + args.deadline * (3 if args.quick else 1)
    for name in args.only.split(","):
        left = deadline - time.monotonic()
        if left < 15:
            summary.add(name, "skipped: overall deadline reached", "-", None)
            continue
        start = time.monotonic()
        try:
            checks[name](min(budgets[name], left))
        except Exception:
            summary.add(name, "crashed: " + traceback.format_exc().strip().splitlines()[-1][:300], "-", False)
            (args.out / f"{name}-crash.txt").write_text(traceback.format_exc())
        print(f"   ({name}: {time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
