"""Plot train/loss and val/loss against the optimizer step for several run dirs, one colour per run.

.venv/bin/python scripts/plot_curves.py RUN_DIR [RUN_DIR ...] --out curves.png [--unigram 2.899] [--ymax 3.6]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from protein_mlm.reporting.tblog import read_scalars  # noqa: E402


def label(run_dir: Path) -> str:
    """The model preset and parameter-free run settings that tell the curves apart."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return run_dir.name
    cfg = OmegaConf.load(config)
    return f"{cfg.model.name} (peak LR {cfg.optimizer.lr:g}, {cfg.trainer.max_steps} steps)"


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start), so the curve keeps its step positions."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="train.py run dirs (with TensorBoard event files)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    parser.add_argument("--smooth", type=int, default=10, help="trailing mean window for train/loss, in steps")
    parser.add_argument("--unigram", type=float, default=None, help="draw this loss as the unigram reference line")
    parser.add_argument("--ymax", type=float, default=None, help="top of the loss axis; higher points are labelled")
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run_dir in enumerate(args.run_dirs):
        scalars = read_scalars(run_dir)
        colour = f"C{i}"
        steps, losses = (np.array(v) for v in zip(*scalars["train/loss"]))
        ax.plot(steps, losses, color=colour, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth(losses, args.smooth), color=colour, label=f"{label(run_dir)}: train/loss")
        if args.ymax is not None and losses.max() > args.ymax:  # a spike above the axis: say where and how high
            peak = int(np.argmax(losses))
            ax.annotate(
                f"train/loss {losses[peak]:.2f} at step {int(steps[peak])}",
                (steps[peak], args.ymax),
                xytext=(steps[peak] + 10, args.ymax * 0.97),
                color=colour,
                fontsize=8,
                arrowprops={"arrowstyle": "->", "color": colour},
            )
        if "val/loss" in scalars:
            val_steps, val_losses = zip(*scalars["val/loss"])
            ax.plot(val_steps, val_losses, "o--", color=colour, label=f"{label(run_dir)}: val/loss")
    if args.unigram is not None:
        ax.axhline(args.unigram, color="grey", linestyle=":", label=f"amino-acid unigram ({args.unigram:.3f})")
    if args.ymax is not None:
        ax.set_ylim(top=args.ymax)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-LM loss (nats per masked residue)")
    ax.set_title("bundled Swiss-Prot sample, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
