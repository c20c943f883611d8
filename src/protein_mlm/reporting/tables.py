"""What a run prints: the composed config as a tree at start, one summary line at the end."""

from pathlib import Path

import rich
import rich.syntax
import rich.table
import rich.tree
from omegaconf import DictConfig, OmegaConf

from protein_mlm.reporting.console import FILE_ONLY

FIRST_GROUPS = ("data", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig) -> None:
    """The composed config as a rich tree, config groups first."""
    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in FIRST_GROUPS if k in cfg] + [k for k in cfg if k not in FIRST_GROUPS]
    for key in keys:
        branch = tree.add(f"[bold]{key}")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def print_plan(rows: list[tuple[str, str]]) -> None:
    """The resolved training plan as a small table, before the first step."""
    table = rich.table.Table(title="training plan", show_header=False)
    for name, value in rows:
        table.add_row(name, value)
        FILE_ONLY.info("plan: %s = %s", name, value)
    rich.print(table)


def print_summary(metrics: dict[str, float], run_dir: Path) -> None:
    """One line: final validation metrics against the unigram baseline, where the run is, how to view it."""
    parts = [f"steps {metrics['steps']}"]
    if "val/loss" in metrics:
        parts += [
            f"val/loss {metrics['val/loss']:.4f}",
            f"val/perplexity {metrics['val/perplexity']:.3f}",
            f"(amino-acid unigram perplexity {metrics['val/unigram_perplexity']:.3f})",
            f"val/accuracy {metrics['val/accuracy']:.4f}",
        ]
    parts += [f"{metrics['wall_time_s']:.0f}s", f"run dir {run_dir}", f"view: tensorboard --logdir {run_dir}"]
    line = "Done: " + ", ".join(parts)
    print(line, flush=True)
    FILE_ONLY.info(line)
