"""Preview a learning-rate schedule before training, from the same configs and code as train.py.

Usage:
  python scripts/plot_schedule.py scheduler=inverse_sqrt scheduler.warmup_steps=16000 trainer.max_steps=500000
  python scripts/plot_schedule.py scheduler=inverse_sqrt,linear scheduler.warmup_steps=2000 --out lr.png
  python scripts/plot_schedule.py scheduler=inverse_sqrt scheduler.warmup_steps=16000 trainer.max_steps=500000 \
      --also "scheduler=linear scheduler.warmup_steps=2000 trainer.max_steps=500000 scheduler.final_lr_ratio=0.1"
"""

import argparse
import sys

from protein_mlm.errors import UserError
from protein_mlm.preview import preview


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (a,b lists allowed)")
    parser.add_argument("--out", default="lr_schedule.png", help="PNG to write (default: lr_schedule.png)")
    parser.add_argument("--also", action="append", default=[], help="another override list, as one string")
    args = parser.parse_args()
    try:
        curves, _ = preview(args.overrides, *(group.split() for group in args.also), out=args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for label, schedule, peak, total in curves:
        milestones = ", ".join(
            f"step {s}: {peak * schedule(s):.3g}" for s in sorted({0, total // 100, total // 10, total - 1})
        )
        print(f"{label}\n  {milestones}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
