"""Training throughput: Hugging Face Trainer (run_mlm-style) baselines vs this project, same model, same data.

    python scripts/benchmark.py                       # esm2_8m on this machine, 60 s per row
    python scripts/benchmark.py --model esm2_150m --rows hf,hf_tuned,ours,ours_16k --seconds 30

Every row runs in its own process (so peak RSS and GPU memory are its own) on the bundled Swiss-Prot training
split, every sequence cut to --max-length tokens (HF rows truncate, ours crops at random, as each does in
training), and is timed for --seconds after --warmup-steps optimizer steps. Tokenization happens before the
clock starts for every row. Rows:
  hf        HF Trainer + DataCollatorForLanguageModeling: fixed batch size, pad to longest, random order, fp32
  hf_tuned  the same with train_sampling_strategy="group_by_length" and bf16
  ours      this project's defaults: token-budget batches (data.max_tokens), trainer.precision=auto
  ours_fp32 / ours_bf16 / ours_compile / ours_eager / ours_16k   ours with 32-true / bf16-mixed / model.compile=true /
            model.compile=false / max_tokens 16384
  ours_packed / ours_packed_compile   ours with data.packing=true (fixed-shape packed rows), and model.compile
  ours_packed_fast / ours_eager_fast   ours_packed_compile / ours_eager with model.fast_layers=true (FastEsmLayer)
  bare      a plain PyTorch loop over ours' batches: the same model, fused AdamW, clipping and LambdaLR; no
            Lightning, no callbacks, no logging (the framework-overhead reference)
The table (markdown) goes to stdout and to --out (default benchmarks/results-<device>.md).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmark_rows import HF, ROOT, Clock, compose, run_bare, run_hf, run_ours  # noqa: E402


def precision_of(row: str) -> str:
    """The precision a row trains in: fixed for hf / hf_tuned / ours_fp32 / ours_bf16, else the project's `auto`."""
    from protein_mlm.plan import resolve_precision

    fixed = {"hf": "32-true", "ours_fp32": "32-true", "hf_tuned": "bf16-mixed", "ours_bf16": "bf16-mixed"}
    return fixed.get(row) or resolve_precision("auto", "auto")


def run_row(args) -> None:
    """Child process: one row, its result as JSON on the last stdout line."""
    result = measure_row(
        args.row, args.model, args.max_length, args.batch_size, args.warmup_steps, args.seconds, args.set
    )
    print("RESULT " + json.dumps(result), flush=True)


def measure_row(row: str, model: str, max_length: int, batch_size: int, warmup: int, seconds: float, extra) -> dict:
    """One row in this process: token counts, timed seconds, compiled graphs and peak memory of this row alone.

    Several rows may run in one process (scripts/gpu_checks.py): compiled graphs, graph-break counters and the GPU's
    peak memory are reset first. Peak RSS is the process's high-water mark (it cannot be reset).
    """
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh compile per row, counted for this row only
    counters.clear()
    if torch.cuda.is_initialized():  # never the first CUDA call: the row's strategy picks the device
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    clock = Clock(warmup, seconds)
    if row in HF:
        result = run_hf(row, model, max_length, batch_size, clock)
    elif row == "bare":
        result = run_bare(model, max_length, clock, extra)
    else:
        result = run_ours(row, model, max_length, clock, extra)
    result["graphs"] = counters["stats"]["unique_graphs"]  # compiled graphs (0 when eager)
    result["graph_breaks"] = sum(counters["graph_break"].values())
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
    result["real_per_s"] = result["real"] / result["seconds"] if result["seconds"] else 0.0
    result["pid"] = os.getpid()  # which process measured it (gpu_checks: one for all rows)
    return result


def matmul_peak_tflops(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul rate: the CPU's practical peak (datasheets give no single number for CPUs)."""
    import torch

    dtype = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def table(results: dict[str, dict], peaks: dict[str, float], params: int, arch: dict) -> str:
    """Markdown: throughput, padding, memory, MFU and the speed-up over the `hf` row."""
    from protein_mlm.model.perf import flops_per_step

    base = results.get("hf", {}).get("real_per_s")
    lines = [
        "| row | precision | real tok/s | padded tok/s | padding eff. | peak RSS GiB | peak GPU GiB | MFU | x hf |",
        "|" + "---|" * 9,
    ]
    for row, r in results.items():
        if "error" in r:
            lines.append(f"| {row} | | failed: {r['error']} | | | | | | |")
            continue
        precision = precision_of(row)
        flops = flops_per_step(params, arch["num_hidden_layers"], arch["hidden_size"], r["real"], r["squares"])
        mfu = f"{flops / r['seconds'] / (peaks[precision] * 1e12):.1%}" if peaks.get(precision) else "-"
        gpu = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        speedup = f"{r['real_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"| {row} | {precision} | {r['real_per_s']:,.0f} | {r['padded'] / r['seconds']:,.0f} | "
            f"{r['real'] / r['padded']:.2f} | {r['peak_rss_gib']:.2f} | {gpu} | {mfu} | {speedup} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_8m", help="model preset (configs/model/)")
    parser.add_argument("--rows", default="hf,hf_tuned,ours,ours_fp32", help="comma-separated rows, in order")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds per row, after warm-up")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence for every row")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch of the HF rows")
    parser.add_argument("--out", type=Path, help="markdown file (default benchmarks/results-<device>.md)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all rows, pooled per row")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for the ours* rows")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        return run_row(args)

    import torch

    from protein_mlm.model.esm import build_model

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        from protein_mlm.model.perf import lookup_peak_tflops

        name = torch.cuda.get_device_name()
        peaks = {p: lookup_peak_tflops(name, p) for p in ("32-true", "bf16-mixed")}
        peak_note = f"datasheet dense peaks of the {name}"
    else:
        peaks = {p: matmul_peak_tflops(p) for p in ("32-true", "bf16-mixed")}
        peak_note = "this CPU's measured 2048x2048 matmul rate (fp32 / bf16)"
    arch = dict(compose(args.model, args.max_length, args.set).model.architecture)  # --set may change it
    params = sum(p.numel() for p in build_model(arch, device="meta").parameters() if p.requires_grad)
    slug = "".join(c if c.isalnum() else "-" for c in (torch.cuda.get_device_name() if on_gpu else "cpu").lower())
    out = args.out or ROOT / "benchmarks" / f"results-{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# Throughput: {args.model}, sequences cut to {args.max_length} tokens, bundled Swiss-Prot",
        "",
        f"Device: {device_name()}; torch {torch.__version__}. Each row: {args.warmup_steps} warm-up steps, then "
        f"{args.seconds:g} s timed, {args.repeats} round(s) pooled. HF rows: batch {args.batch_size}. "
        f"MFU against {peak_note}: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items() if v),
        "",
        f"Command: `{' '.join(['python scripts/benchmark.py', *sys.argv[1:]])}`",
        "",
    ]
    results: dict[str, dict] = {}
    for _ in range(args.repeats):  # rounds over all rows, so a load that comes and goes hits every row alike
        for row in args.rows.split(","):
            results[row] = merge(results.get(row), run_in_child(row))
            print(f"{row}: {results[row]}", file=sys.stderr, flush=True)
            text = "\n".join([*header, table(results, peaks, params, arch), ""])
            out.write_text(text)  # after every row, so an interrupted benchmark keeps what it measured
            out.with_suffix(".json").write_text(json.dumps({"peaks": peaks, "rows": results}, indent=1))
    print(text)


def merge(total: dict | None, new: dict) -> dict:
    """Pool the rounds of one row: tokens and seconds add up, peaks take the maximum."""
    if total is None or "error" in new:
        return new
    if "error" in total:
        return total  # one failed round marks the row failed
    merged = {k: total[k] + new[k] for k in ("steps", "seconds", "real", "padded", "squares")}
    merged.update({k: max(total.get(k, 0), new.get(k, 0)) for k in ("graphs", "graph_breaks")})
    for k in ("peak_rss_gib", "peak_gpu_gib"):
        merged[k] = max(total[k], new[k]) if total[k] is not None else None
    merged["real_per_s"] = merged["real"] / merged["seconds"]
    return merged


def run_in_child(row: str) -> dict:
    """One row in a fresh Python process: its result, or the last line of its error."""
    proc = subprocess.run([sys.executable, __file__, "--row", row, *sys.argv[1:]], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    main()
