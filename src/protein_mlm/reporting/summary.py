"""The summary of a sweep: one row per job (summary.csv, summary.md) and one figure (summary.png).

Rebuilt from what the jobs wrote (their TensorBoard events and status.json), never from state kept in memory, so
`scripts/summarize_sweep.py` gives the same result for a finished or a partial sweep.
"""

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from protein_mlm.overrides import override_key, override_value
from protein_mlm.reporting.tblog import read_scalars

STATUS_FILE = "status.json"  # how a run ended, written by write_status

COLUMNS = [
    "job",  # the job dir: the values of the swept keys, e.g. scheduler.warmup_steps=1000
    "status",
    "steps",
    "final_val_loss",
    "best_val_loss",
    "best_val_perplexity",
    "tokens_per_sec",
    "wall_time_s",
    "message",
]
ZERO_SHOT_PREFIX = "val/zero_shot/"  # callbacks.zero_shot's metrics: one column each, the last validation's value


def write_status(run_dir: str | Path, status: str, **fields: Any) -> None:
    """Record how a run ended (`running` until then; `completed`, `failed`, `diverged`, `preempted`) beside its logs."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / STATUS_FILE).write_text(json.dumps({"status": status, **fields}, indent=2, default=str))


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))


def _values(scalars: dict, tag: str) -> list[float]:
    return [v for _, v in scalars.get(tag, [])]


def _job_scalars(job_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return read_scalars(job_dir)


def _job_overrides(job_dir: Path) -> list[str]:
    return [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]


def job_row(job_dir: Path, overrides: list[str], scalars: dict, label_keys: list[str] | None = None) -> dict:
    """One summary row, from a job's overrides, event-file scalars and status.json."""
    if label_keys:
        overrides = [o for o in overrides if override_key(o) in label_keys]
    status_path = job_dir / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.is_file() else {"status": "running or killed"}
    val_loss, val_ppl = _values(scalars, "val/loss"), _values(scalars, "val/perplexity")
    train_steps = [s for s, _ in scalars.get("train/loss", [])]
    speed = _values(scalars, "perf/tokens_per_sec")[1:]  # the first step includes warm-up work
    message = status.get("message", "")
    if status.get("step") is not None:
        message = f"step {status['step']}: {message}"
    zero_shot = {
        tag.removeprefix("val/"): values[-1][1]
        for tag, values in scalars.items()
        if tag.startswith(ZERO_SHOT_PREFIX) and values
    }
    return {
        "job": " ".join(overrides) or job_dir.name,
        "status": status["status"],
        "steps": max(train_steps) + 1 if train_steps else 0,
        "final_val_loss": val_loss[-1] if val_loss else math.nan,
        "best_val_loss": min(val_loss) if val_loss else math.nan,
        "best_val_perplexity": min(val_ppl) if val_ppl else math.nan,
        "tokens_per_sec": statistics.median(speed) if speed else math.nan,
        "wall_time_s": status.get("wall_time_s", math.nan),
        "message": message,
        **zero_shot,
    }


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/")


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS, then the zero-shot ones any job logged (before the message, which is often long)."""
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    return COLUMNS[:-1] + extra + COLUMNS[-1:]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = columns_of(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, math.nan)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def best_trial_note(sweep_dir: Path) -> str:
    """The search's best trial, from the Optuna sweeper's optimization_results.yaml (empty for a grid sweep)."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return ""
    results = OmegaConf.to_container(OmegaConf.load(path))
    params = " ".join(f"{k}={v}" for k, v in results.get("best_params", {}).items())
    return f"\nBest trial: best val/loss {results.get('best_value')} with {params}\n"


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing, so the first points are not pulled to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_sweep(job_scalars: list[dict], labels: list[str], path: Path) -> list[tuple[str, list[str]]]:
    """LR, training loss (smoothed over the raw curve) and validation loss vs step of every job, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lr, ax_train, ax_val) = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (scalars, label) in enumerate(zip(job_scalars, labels)):
        color = colors[i % len(colors)]
        for tag, series in scalars.items():
            if tag.startswith("lr-"):
                ax_lr.plot(*zip(*series), color=color, label=f"{label} ({tag})" if "/" in tag else label)
        if scalars.get("train/loss"):
            steps, losses = zip(*sorted(dict(scalars["train/loss"]).items()))
            ax_train.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
            ax_train.plot(steps, smoothed(list(losses)), color=color, label=label)
        if scalars.get("val/loss"):
            ax_val.plot(*zip(*sorted(dict(scalars["val/loss"]).items())), color=color, marker="o", label=label)
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="LR per step")
    ax_train.set(
        xlabel="optimizer step", ylabel="train/loss (nats per target)", title="training loss (EMA 0.9; raw faint)"
    )
    ax_val.set(xlabel="optimizer step", ylabel="val/loss (nats per target)", title="validation loss")
    for ax in (ax_lr, ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    panels = [(ax.get_title(), ax.get_legend_handles_labels()[1]) for ax in (ax_lr, ax_train, ax_val)]
    plt.close(fig)
    return panels  # (title, legend labels) of each panel, for tests


def sort_key(overrides: list[str], keys: list[str]) -> tuple:
    """Order jobs by the values of the swept keys, numbers as numbers (5 < 30 < 100), then text."""

    def value(key: str) -> tuple:
        raw = next((override_value(o) for o in overrides if override_key(o) == key), "")
        try:
            return (0, float(raw), "")
        except ValueError:
            return (1, 0.0, raw)

    return tuple(value(k) for k in keys)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write summary.csv, summary.md and summary.png into the sweep dir; return the rows."""
    sweep_dir = Path(sweep_dir)
    job_dirs = _job_dirs(sweep_dir)
    all_overrides = [_job_overrides(j) for j in job_dirs]
    all_scalars = [_job_scalars(j) for j in job_dirs]  # each job's event files are read once
    # Label jobs by the overrides that differ between them (all of them when there is only one job).
    keys = sorted({override_key(o) for overrides in all_overrides for o in overrides})
    varying = [k for k in keys if len({tuple(o for o in ov if override_key(o) == k) for ov in all_overrides}) > 1]
    order = sorted(range(len(job_dirs)), key=lambda i: sort_key(all_overrides[i], varying))  # 5, 30, 100
    job_dirs, all_overrides, all_scalars = ([seq[i] for i in order] for seq in (job_dirs, all_overrides, all_scalars))
    rows = [job_row(*job, varying or None) for job in zip(job_dirs, all_overrides, all_scalars)]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns_of(rows), restval=math.nan)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown_table(rows) + best_trial_note(sweep_dir))
    if job_dirs:
        plot_sweep(all_scalars, [r["job"] for r in rows], sweep_dir / "summary.png")
    return rows
