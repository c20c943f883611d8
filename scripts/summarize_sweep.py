"""Rebuild summary.csv, summary.md and summary.png of a finished or partial sweep.

Usage: python scripts/summarize_sweep.py multirun/<date>/<time>
"""

import sys
from pathlib import Path

from protein_mlm.reporting.summary import markdown_table, write_summary


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/summarize_sweep.py <sweep dir, e.g. multirun/2026-01-01/12-00-00>")
    rows = write_summary(sys.argv[1])
    if not rows:
        sys.exit(f"error: {sys.argv[1]} holds no Hydra jobs (no */.hydra/overrides.yaml); pass a multirun sweep dir")
    print(markdown_table(rows), end="")


if __name__ == "__main__":
    main()
