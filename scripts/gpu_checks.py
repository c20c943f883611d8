"""The GPU checks as a gate: one command, an overall deadline, a time budget per check, checks in order of value.

    python scripts/gpu_checks.py --out $OUT            # on the GPU machine (scripts/gpu_setup.sh run $OUT)
    python scripts/gpu_checks.py --out /tmp/x --quick  # the same code on a CPU with the tiny model

Each result is written to OUT/summary.md as soon as it is measured: check, measured, threshold, pass/fail and the
seconds it took, under a header with the torch / transformers / Lightning / CUDA versions and the attention path
packed batches take. A check or row its budget does not reach is listed as "not run: budget", never left out.
1. sync: packed esm2_150m updates through Trainer.fit with `set_sync_debug_mode("error")` on non-logging steps.
2. attention: training-shaped cu_seqlens from collate_packed (row tails, bucket) through varlen flash vs the
   block-diagonal reference (values, gradients zeroed between paths), and its time vs the same tokens in compact
   segments (no bucket, exact max_seqlen).
3. throughput: scripts/benchmark.py rows, all in this one process (every ratio from one run on one warm GPU):
   esm2_150m ours_packed_compile, hf_tuned, ours_packed, then esm2_650m ours_packed_compile, hf_tuned; MFU,
   x hf_tuned, compiled-graph counts.
4. loss: packed eager vs packed compiled on identical batches (two processes at once): mean loss of steps 31-50
   within 2e-3 relative.
5. fsdp: trainer=fsdp on the one GPU vs trainer=gpu (two processes at once): the first 10 losses within 1e-2
   relative.
Nothing GPU-only is imported before a check needs it, and no CUDA context is made before a check's own strategy
(or, for the attention check, an explicit `set_device`) picks the device.
"""

import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py and benchmark_rows.py, also when imported
from benchmark_rows import WORK  # noqa: E402  (stdlib-only at import time)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TARGET_MFU = {"esm2_150m": 0.25, "esm2_650m": 0.40}  # issue targets on an H200
TARGET_X_HF = {"esm2_150m": 2.5, "esm2_650m": 2.0}
# Seconds at most, 470 in all (the 8-minute gate). Measured on an H200 (2026-12-04, a process per row): sync 62,
# attention 3, five throughput rows ~370 (about 30 s of each was the child's start-up and data load, gone now).
BUDGETS = {"sync": 70, "attention": 20, "throughput": 220, "loss": 85, "fsdp": 75}
QUICK_BUDGETS = {"sync": 60, "attention": 10, "throughput": 90, "loss": 60, "fsdp": 60}  # a 2-core CPU
THROUGHPUT = [  # (model, tokens per step of ours, HF batch size, rows in order), the model's label
    ("esm2_150m", 65536, 64, ["ours_packed_compile", "hf_tuned", "ours_packed"]),
    ("esm2_650m", 40960, 32, ["ours_packed_compile", "hf_tuned"]),
]
QUICK_ROW = dict(model="tiny", tokens=1024, batch_size=16, max_length=128, seconds=1.0, warmup=2)
QUICK_DATA = ["data.max_length=128", "data.max_tokens=1024"]  # --quick: short rows, small steps
# The end-of-fit validation would read the whole held-out split (10,000 sequences): these checks compare training
# losses, so two batches show that validation runs.
SHORT_VALIDATION = ["+trainer.limit_val_batches=2"]
FULL_ROW = dict(max_length=1024, seconds=8.0, warmup=3)


class BudgetExceeded(BaseException):
    """Raised by `time_limit` (a BaseException, so no `except Exception` on the way swallows it)."""


@contextmanager
def time_limit(seconds: float):
    """Stop the work inside after `seconds` (SIGALRM; the main thread only). Nested limits keep the outer one."""

    def expire(signum, frame):
        raise BudgetExceeded(f"budget of {seconds:.0f} s spent")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    if outer and outer < seconds:  # the enclosing limit ends first: it stays in charge
        signal.setitimer(signal.ITIMER_REAL, outer)
        signal.signal(signal.SIGALRM, previous)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # what is left of the enclosing limit
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.01))


class Summary:
    """OUT/summary.md, rewritten after every result (a run cut short keeps what it measured)."""

    def __init__(self, out: Path, quick: bool):
        self.path, self.quick, self.rows = out / "summary.md", quick, []
        self.write()

    def add(self, check: str, measured: str, threshold: str, passed: bool | None, seconds: float) -> None:
        verdict = {True: "pass", False: "**FAIL**", None: "info"}[passed]
        self.rows.append(f"| {check} | {measured} | {threshold} | {verdict} | {seconds:.0f} |")
        self.write()
        print(f"== {check}: {measured} [{threshold}] {verdict} ({seconds:.0f} s)", flush=True)

    def not_run(self, check: str, why: str, threshold: str = "-") -> None:
        """A check or row that did not run: listed, never missing (`passed` None: not a result)."""
        self.add(check, f"not run: {why}", threshold, None, 0)

    def write(self) -> None:
        table = ["| check | measured | threshold | result | seconds |", "|---|---|---|---|---|"]
        self.path.write_text("\n".join([*header(self.quick), "", *table, *self.rows, ""]))


def header(quick: bool) -> list[str]:
    """Versions, the device and the attention path, first in the summary.

    The device is named once a check has picked it (before that, asking would create a CUDA context on
    whichever GPU is current).
    """
    import pytorch_lightning
    import torch
    import transformers

    device, path = "CPU", "block-diagonal SDPA reference (CPU)"
    if torch.cuda.is_available():
        device, path = "a GPU (named once a check has picked it)", "-"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from protein_mlm.model import attention

        device = torch.cuda.get_device_properties(torch.cuda.current_device()).name
        probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
        kernel = attention.varlen_kernel(probe, probe)
        path = f"varlen flash ({kernel.__module__}.{kernel.__name__})" if kernel else "block-diagonal SDPA reference"
    return [
        f"# GPU checks{' (--quick, CPU)' if quick else ''}: {device}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, transformers {transformers.__version__}, "
        f"Lightning {pytorch_lightning.__version__}; packed attention: {path}",
        f"Command: `python scripts/gpu_checks.py {' '.join(sys.argv[1:])}`",
    ]


def run_children(commands: dict[str, list[str]], budget: float, out: Path) -> dict[str, tuple[int, str]]:
    """Python children at once, each with its own log OUT/NAME.log: name -> (exit code, log text).

    All are stopped when the budget ends (exit 124): a hung check costs its budget, not the run.
    """
    deadline, procs = time.monotonic() + budget, {}
    for name, args in commands.items():
        log = (out / f"{name}.log").open("w")  # a file, not a pipe: a child never blocks on a full pipe
        procs[name] = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True
        )
        log.close()
    codes = {}
    try:
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[name] = 124
    finally:  # also when an enclosing limit stops this wait: no child outlives its check
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and its data-loader workers
                proc.wait()
    return {name: (codes[name], (out / f"{name}.log").read_text()) for name in procs}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def check_sync(summary: Summary, quick: bool, budget: float, out: Path) -> None:
    """No host sync on the non-logging steps of 20 packed updates (in a child, under the budget)."""
    start = time.monotonic()
    code, log = run_children({"sync": [__file__, "--inner", "sync", *(["--quick"] if quick else [])]}, budget, out)[
        "sync"
    ]
    ok = code == 0 and "SYNC-OK" in log
    measured = "no sync on non-logging steps" if ok else failure(code, log, budget)
    check = f"sync ({sync_steps(quick)} packed updates, {'tiny' if quick else 'esm2_150m'})"
    summary.add(check, measured, "0 syncs", ok if not quick else None, elapsed(start))


def sync_steps(quick: bool) -> int:
    return 10 if quick else 20  # --quick: the steps between the first two and the logging one still run guarded


def failure(code: int, log: str, budget: float) -> str:
    """What a failed child says: its budget, or its last line."""
    return f"not run: budget ({budget:.0f} s) spent" if code == 124 else f"failed: {last_line(log)}"


def elapsed(start: float) -> float:
    return time.monotonic() - start


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
        [
            "data.packing=true",
            f"trainer.max_steps={sync_steps(quick)}",
            "model.compile=false",
            "trainer.val_check_interval=1000",
            *SHORT_VALIDATION,
            *(QUICK_DATA if quick else []),
        ],
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

    cache = f"paths.cache_dir={WORK / 'data'}"  # one cache for every check (benchmark_rows' too)
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
        summary.not_run("attention (varlen flash vs reference)", "needs CUDA")
        return
    began = time.monotonic()
    torch.cuda.set_device(0)  # this check's own choice of device, before its first CUDA call
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
    seconds = elapsed(began)
    summary.add(
        "attention values vs reference (bf16, rel. to max)", f"{out_err:.2e}", "<= 1e-2", out_err <= 1e-2, seconds
    )
    summary.add("attention gradients vs reference (bf16)", f"{grad_err:.2e}", "<= 2e-2", grad_err <= 2e-2, seconds)
    ratio = times["training"] / times["compact"]
    summary.add(
        "attention time, training-shaped vs compact",
        f"{times['training']:.2f} vs {times['compact']:.2f} ms = {ratio:.2f}x; {segments}; reference "
        f"{times['reference']:.2f} ms",
        "<= 1.3x",
        ratio <= 1.3,
        seconds,
    )


def check_throughput(summary: Summary, quick: bool, budget: float, out: Path) -> None:
    """Every row in this process, one after another on one warm device: MFU, x hf_tuned (same run), graphs."""
    deadline, results = time.monotonic() + budget, {}
    setting = {**FULL_ROW, **(QUICK_ROW if quick else {})}
    for model, tokens, batch_size, rows in THROUGHPUT:
        label = f"tiny (as {model})" if quick else model
        name, tokens, batch_size = (
            setting.get(k, v) for k, v in (("model", model), ("tokens", tokens), ("batch_size", batch_size))
        )
        results[label] = {}
        for row in rows:
            results[label][row] = run_row(name, row, tokens, batch_size, setting, deadline - time.monotonic())
        report_model(summary, label, model, name, results[label], setting, out)
    (out / "throughput.json").write_text(json.dumps(results, indent=1))


def run_row(model: str, row: str, tokens: int, batch_size: int, setting: dict, left: float) -> dict:
    """One benchmark row here, stopped when the check's budget ends; its result, or why it has none."""
    from benchmark import measure_row

    if left < setting["seconds"] + 5:  # not even the timed window fits
        return {"error": "not run: budget", "wall": 0.0}
    start = time.monotonic()
    overrides = [f"data.max_tokens={tokens}"]
    try:
        with time_limit(left):
            result = measure_row(
                row, model, setting["max_length"], batch_size, setting["warmup"], setting["seconds"], overrides
            )
    except BudgetExceeded:
        result = {"error": f"not run: budget (stopped after {elapsed(start):.0f} s)"}
    except Exception as e:  # one failed row does not stop the others
        result = {"error": f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e) else ''}"}
    finally:
        free_memory()
    result["wall"] = elapsed(start)
    return result


def free_memory() -> None:
    """What one row held, released before the next (the caching allocator keeps it otherwise)."""
    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def report_model(summary: Summary, label: str, model: str, name: str, rows: dict, setting: dict, out: Path) -> None:
    """A summary row per benchmark row, ratios against this run's hf_tuned; the full table to OUT/bench-MODEL.md."""
    import benchmark

    from protein_mlm.model.esm import build_model
    from protein_mlm.model.perf import flops_per_step

    arch = dict(compose(name, []).model.architecture)
    params = sum(p.numel() for p in build_model(arch, device="meta").parameters() if p.requires_grad)
    peaks = peak_tflops(setting)
    slug = label.replace(" ", "-").replace("(", "").replace(")", "")
    (out / f"bench-{slug}.md").write_text(benchmark.table(rows, peaks, params, arch) + "\n")
    hf = rows.get("hf_tuned", {}).get("real_per_s")
    for row, r in rows.items():
        check = f"throughput {label} {row}"
        if "error" in r:
            summary.add(check, r["error"], "-", None if r["error"].startswith("not run") else False, r["wall"])
            continue
        peak = peaks.get(benchmark.precision_of(row)) or 0
        flops = flops_per_step(params, arch["num_hidden_layers"], arch["hidden_size"], r["real"], r["squares"])
        mfu = flops / r["seconds"] / (peak * 1e12) if peak and r["seconds"] else math.nan
        x_hf = f", {r['real_per_s'] / hf:.2f}x hf_tuned (this run)" if hf and row != "hf_tuned" else ""
        graphs = f", {r['graphs']} graphs / {r['graph_breaks']} breaks"
        measured = f"{r['real_per_s']:,.0f} real tok/s, MFU {mfu:.1%}{x_hf}{graphs}, {r['peak_gpu_gib'] or 0:.0f} GiB"
        if row == "ours_packed_compile" and model in TARGET_MFU and not setting.get("model"):
            target = f"MFU >= {TARGET_MFU[model]:.0%}, >= {TARGET_X_HF[model]}x hf_tuned"
            passed = bool(hf) and mfu >= TARGET_MFU[model] and r["real_per_s"] / hf >= TARGET_X_HF[model]
            summary.add(check, measured, target, passed, r["wall"])
        else:
            summary.add(check, measured, "-", None, r["wall"])


def peak_tflops(setting: dict) -> dict:
    """Datasheet peaks of the GPU the rows ran on, or this CPU's measured matmul rate (small matrices in --quick)."""
    import benchmark
    import torch

    from protein_mlm.model.perf import lookup_peak_tflops

    precisions = ("32-true", "bf16-mixed")
    if torch.cuda.is_initialized():  # the rows picked the device
        name = torch.cuda.get_device_properties(torch.cuda.current_device()).name
        return {p: lookup_peak_tflops(name, p) for p in precisions}
    size = 512 if setting.get("model") else 2048
    return {p: benchmark.matmul_peak_tflops(p, size) for p in precisions}


def check_loss(summary: Summary, quick: bool, budget: float, out: Path) -> None:
    """Packed eager vs packed compiled, identical batches (same seed and data), both at once: steps 31-50 mean loss."""
    steps, window = loss_steps(quick), loss_window(quick)
    check = f"loss: packed eager vs compiled, steps {steps - window + 1}-{steps}"
    start, threshold = time.monotonic(), "<= 2e-3 rel."
    variant = ["--quick"] if quick else []
    runs = run_children(
        {f"loss-{n}": [__file__, "--inner", "loss", "--variant", n, *variant] for n in ("eager", "compiled")},
        budget,
        out,
    )
    means = {}
    for name, (code, log) in runs.items():
        line = next((x for x in log.splitlines() if x.startswith("LOSS ")), None)
        if line is None:
            summary.add(
                check,
                f"{name}: {failure(code, log, budget)}",
                threshold,
                None if code == 124 else False,
                elapsed(start),
            )
            return
        means[name.removeprefix("loss-")] = json.loads(line[5:])
    eager, compiled = means["eager"]["mean"], means["compiled"]["mean"]
    diff = abs(compiled - eager) / eager
    measured = f"{eager:.4f} vs {compiled:.4f} (rel. {diff:.1e}), {means['compiled']['graphs']} graphs"
    summary.add(check, measured, threshold, diff <= 2e-3, elapsed(start))


def inner_loss(quick: bool, variant: str) -> None:
    """One side of the loss check (a child): the mean train/loss of the last 20 of its steps, and its graphs."""
    from omegaconf import open_dict
    from torch._dynamo.utils import counters

    from protein_mlm.reporting.tblog import read_scalars
    from protein_mlm.train import train

    steps = loss_steps(quick)
    cfg = compose(
        "tiny" if quick else "esm2_8m",
        [
            "data.packing=true",
            *(QUICK_DATA if quick else ["data.max_tokens=16384"]),
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000",
            f"model.compile={variant == 'compiled'}",
            "print_config=false",
            "callbacks.model_checkpoint=null",
            *SHORT_VALIDATION,
        ],
    )
    run_dir = Path(os.environ["GPU_CHECKS_OUT"]) / f"loss-{variant}"
    with open_dict(cfg):
        cfg.callbacks.progress_bar = None
        cfg.paths.output_dir = str(run_dir)
    train(cfg)
    losses = dict(read_scalars(run_dir)["train/loss"])
    window = loss_window(quick)
    mean = sum(losses[s] for s in range(steps - window, steps)) / window
    print("LOSS " + json.dumps({"mean": mean, "graphs": counters["stats"]["unique_graphs"]}), flush=True)


def loss_steps(quick: bool) -> int:
    return 10 if quick else 50  # --quick: a CPU compiles and trains slowly


def loss_window(quick: bool) -> int:
    return 5 if quick else 20  # the mean of the last steps (the early ones differ most by chance)


def check_fsdp(summary: Summary, quick: bool, budget: float, out: Path) -> None:
    """trainer=fsdp on one GPU against trainer=gpu, both at once: the same first 10 losses (the sharded step is the
    plain one). --quick: FSDP needs a GPU, so trainer=cpu twice runs the comparison's code."""
    from protein_mlm.reporting.tblog import read_scalars

    start, check, threshold = time.monotonic(), "fsdp vs gpu: first 10 losses", "<= 1e-2"
    trainers = {"gpu": "cpu", "fsdp": "cpu"} if quick else {"gpu": "gpu", "fsdp": "fsdp"}
    overrides = ["experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=10", "data.packing=false"]
    overrides += [
        f"paths.cache_dir={WORK / 'data'}",
        "callbacks.model_checkpoint=null",
        *SHORT_VALIDATION,
    ]  # tokenized by main()
    commands = {
        f"fsdp-{name}": [
            str(ROOT / "train.py"),
            *overrides,
            f"trainer={trainer}",
            "trainer.devices=1",
            f"hydra.run.dir={out / f'fsdp-{name}'}",
        ]
        for name, trainer in trainers.items()
    }
    losses = {}
    for name, (code, log) in run_children(commands, budget, out).items():
        if code:
            summary.add(
                f"{check} ({name})",
                failure(code, log, budget),
                threshold,
                None if code == 124 else False,
                elapsed(start),
            )
            return
        losses[name] = [v for _, v in sorted(read_scalars(out / name)["train/loss"])][:10]
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["fsdp-fsdp"], losses["fsdp-gpu"], strict=True))
    if quick:
        check = "fsdp comparison code (--quick: trainer=cpu twice; FSDP needs a GPU)"
    summary.add(check, f"max rel. diff {diff:.1e}", threshold, diff <= 1e-2 if not quick else None, elapsed(start))


def prepare_data() -> None:
    """Tokenize the bundled data once, before children that would otherwise race to build the same cache."""
    from benchmark_rows import train_split

    train_split(1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for summary.md and the raw results")
    parser.add_argument("--quick", action="store_true", help="tiny models, short runs (checks the script on a CPU)")
    parser.add_argument("--deadline", type=float, default=sum(BUDGETS.values()), help="seconds for all checks")
    parser.add_argument("--only", default=",".join(BUDGETS), help="comma-separated checks, run in this order")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # internal: one check's work in a child process
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: eager / compiled for --inner loss
    args = parser.parse_args()
    if args.inner == "sync":
        return inner_sync(args.quick)
    if args.inner == "loss":
        return inner_loss(args.quick, args.variant)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["GPU_CHECKS_OUT"] = str(args.out.resolve())
    run_checks(args.out, args.quick, args.only.split(","), args.deadline)


def run_checks(out: Path, quick: bool, names: list[str], deadline_s: float) -> None:
    """The checks in order, each under min(its budget, what is left of the deadline); the rest listed as not run."""
    budgets = QUICK_BUDGETS if quick else BUDGETS
    summary = Summary(out, quick)
    checks = {
        "sync": lambda b: check_sync(summary, quick, b, out),
        "attention": lambda b: check_attention(summary, quick, b),
        "throughput": lambda b: check_throughput(summary, quick, b, out),
        "loss": lambda b: check_loss(summary, quick, b, out),
        "fsdp": lambda b: check_fsdp(summary, quick, b, out),
    }
    deadline = time.monotonic() + deadline_s * (sum(QUICK_BUDGETS.values()) / sum(BUDGETS.values()) if quick else 1)
    prepare_data()  # inside the deadline: a fresh machine tokenizes here
    for name in names:
        left = deadline - time.monotonic()
        if left < 15:
            summary.not_run(name, "budget (the overall deadline was reached)")
            continue
        start, budget = time.monotonic(), min(budgets[name], left)
        try:
            with time_limit(budget + 5):  # the children stop themselves at the budget; this is for in-process work
                checks[name](budget)
        except BudgetExceeded:
            summary.add(name, f"not run: budget ({budget:.0f} s) spent", "-", None, elapsed(start))
        except Exception:
            summary.add(
                name, "crashed: " + traceback.format_exc().strip().splitlines()[-1][:300], "-", False, elapsed(start)
            )
            (out / f"{name}-crash.txt").write_text(traceback.format_exc())
        print(f"   ({name}: {elapsed(start):.0f} s)", flush=True)
    summary.write()  # the device line, now that the checks have picked the device


if __name__ == "__main__":
    main()
