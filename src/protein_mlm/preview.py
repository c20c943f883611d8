"""`scripts/plot_schedule.py`: plot the LR curve a config plans, from the same Hydra config and schedule code
as training; multirun-style lists (scheduler=inverse_sqrt,linear) give one curve per combination."""

from pathlib import Path

from protein_mlm.composition import compose_checked
from protein_mlm.overrides import override_key
from protein_mlm.plan import build_schedule, schedule_label
from protein_mlm.reporting.lr_plan import plot_lr_curves
from protein_mlm.sweep import expand_sweep


def preview(*override_groups: list[str], out: str | Path) -> tuple[list[tuple], object]:
    """Compose every combination of every group, build its schedule, plot all into `out`; return curves, figure."""
    curves = []
    for overrides in override_groups:
        combos, swept = expand_sweep(overrides)
        for combo in combos:
            cfg = compose_checked("train", combo)
            swept_values = " ".join(o for o in combo if override_key(o) in swept)
            label = swept_values if swept_values and len(override_groups) == 1 else schedule_label(cfg)
            curves.append((label, build_schedule(cfg), cfg.optimizer.lr, cfg.trainer.max_steps))
    return curves, plot_lr_curves(curves, out, title="planned learning rate")
