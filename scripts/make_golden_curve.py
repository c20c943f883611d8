"""Write the reference loss curve that tests/test_golden.py compares every training run of today's code against.

    .venv/bin/python scripts/make_golden_curve.py                  # rewrite tests/golden/tiny_200.json
    .venv/bin/python scripts/make_golden_curve.py --out other.json # leave the committed curve alone

Regenerate (and commit, saying why) only when a change is meant to alter training numerics.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_200.json"
NUM_THREADS = 1  # one thread: the summation order inside CPU kernels, and so every rounding, is fixed

# The run: the tiny model on the bundled data, CPU and fp32 (bf16 autocast would depend on the CPU's features).
OVERRIDES = [
    "model=tiny",
    "seed=0",
    f"num_threads={NUM_THREADS}",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=200",
    "trainer.val_check_interval=200",
    "trainer.num_sanity_val_steps=0",
    "scheduler=inverse_sqrt",
    "scheduler.warmup_steps=20",
    "optimizer=adamw",
    "optimizer.lr=1e-3",
    "data.max_length=128",
    "data.max_tokens=1024",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.resume_checkpoint=null",
    "print_config=false",
]


def run(out: Path, cache_dir: Path, extra: list[str]) -> dict:
    """Train with OVERRIDES (+ extra) through the real `train(cfg)` and write the per-step curve to `out`."""
    os.environ.setdefault("OMP_NUM_THREADS", str(NUM_THREADS))
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from protein_mlm.reporting.tblog import read_scalars
    from protein_mlm.train import train

    overrides = OVERRIDES + [f"paths.cache_dir={cache_dir}"] + extra
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = run_dir
        metrics = train(cfg)
        scalars = read_scalars(Path(run_dir))
    losses, lrs = dict(scalars["train/loss"]), dict(scalars[cfg.scheduler.name])
    curve = {
        "overrides": OVERRIDES + extra,
        "num_threads": NUM_THREADS,
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "pytorch-lightning", "transformers", "numpy", "datasets")},
        },
        "steps": [{"step": s, "loss": losses[s], "lr": lrs[s]} for s in sorted(losses)],
        "final_val_loss": metrics["val/loss"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(curve, indent=1) + "\n")
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN, help="where to write the curve (JSON)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "protein_mlm", help="tokenized data cache")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (to test the test: e.g. seed=1)")
    args = parser.parse_args()
    curve = run(args.out, args.cache_dir, args.overrides)
    steps = curve["steps"]
    print(
        f"wrote {args.out}: {len(steps)} steps, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
