"""The planned LR curve of a run: plotted before training, and audited against what was logged after it."""

import logging
import math
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PLOTTED_POINTS = 4000  # a 500k-step schedule is drawn from an even subsample of its steps


def planned_lrs(schedule: Callable[[int], float], peak_lr: float, total_steps: int) -> list[float]:
    """The LR of every optimizer update 0 .. total_steps-1, from the same function the run steps."""
    return [peak_lr * schedule(step) for step in range(total_steps)]


def plotted_steps(total_steps: int) -> list[int]:
    stride = max(1, math.ceil(total_steps / MAX_PLOTTED_POINTS))
    steps = list(range(0, total_steps, stride))
    return steps if steps[-1] == total_steps - 1 else [*steps, total_steps - 1]


def plot_lr_curves(curves: list[tuple[str, Callable[[int], float], float, int]], path: str | Path, title: str):
    """One figure of LR vs optimizer step for each (label, schedule, peak LR, total steps); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, schedule, peak_lr, total_steps in curves:
        steps = plotted_steps(total_steps)
        ax.plot(steps, [peak_lr * schedule(s) for s in steps], label=label)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=title)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    # Below the axes: long labels inside would cover the curves' peaks.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def audit_logged_lrs(logged: list[tuple[int, float]], planned: list[float], rel_tol: float = 1e-5) -> str | None:
    """None when every logged (step, LR) equals the plan (TensorBoard stores float32); else what differs."""
    if not logged:
        return "no LR was logged"
    wrong = [(s, v) for s, v in logged if s >= len(planned) or not math.isclose(v, planned[s], rel_tol=rel_tol)]
    missing = len(set(range(min(len(planned), max(s for s, _ in logged) + 1))) - {s for s, _ in logged})
    if not wrong and not missing:
        return None
    parts = [f"{len(wrong)} of {len(logged)} logged steps differ from the plan"]
    if wrong:
        step, value = wrong[0]
        planned_value = planned[step] if step < len(planned) else float("nan")
        parts.append(f"first at step {step}: logged {value:.6g}, planned {planned_value:.6g}")
    if missing:
        parts.append(f"{missing} steps have no logged LR")
    return "; ".join(parts)
