"""Learning-rate schedules as pure `step -> multiplier of the peak LR` functions.

`step` is the 0-based index of the optimizer update the LR is used for, so `peak * f(step)` is exactly the
value the LR monitor logs at that step. Hydra instantiates these as `_partial_` functions and
`lambda_scheduler` wraps one in `LambdaLR`, which Lightning steps once per optimizer update.
"""

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(warmup_steps: int, peak_lr: float, warmup_init_lr: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup_steps} is negative; use 0 (no warmup) or more")
    if peak_lr <= 0:
        raise ValueError(f"peak LR {peak_lr} must be > 0; set optimizer.lr to a positive value")
    if warmup_init_lr < 0:
        raise ValueError(f"scheduler.warmup_init_lr={warmup_init_lr} is negative; use 0 or more")


def _warmup(step: int, warmup_steps: int, peak_lr: float, warmup_init_lr: float) -> float:
    """Linear ramp from warmup_init_lr to the peak (as fairseq's `warmup_init_lr`)."""
    init = warmup_init_lr / peak_lr
    return init + (1.0 - init) * step / warmup_steps


def _check_decay(warmup_steps: int, decay_end: float) -> None:
    if decay_end <= warmup_steps:
        raise ValueError(
            f"the decay ends at step {decay_end:g}, not after warmup_steps={warmup_steps}; "
            "raise trainer.max_steps (or scheduler.decay_end_fraction) or lower scheduler.warmup_steps"
        )


def _decay_progress(step: int, warmup_steps: int, decay_end: float) -> float:
    """Fraction of the decay phase done at `step`, clipped to [0, 1]."""
    return min(1.0, (step - warmup_steps) / (decay_end - warmup_steps))


def _warmup_then(
    step: int, warmup_steps: int, decay_end: float, peak_lr: float, warmup_init_lr: float, decay: Callable
) -> float:
    """Linear warmup, then `decay(progress)` with progress from 0 (end of warmup) to 1 (`decay_end`) and after."""
    _check(warmup_steps, peak_lr, warmup_init_lr)
    _check_decay(warmup_steps, decay_end)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr, warmup_init_lr)
    return decay(_decay_progress(step, warmup_steps, decay_end))


def constant(step: int, *, warmup_steps: int = 0, peak_lr: float = 1.0, warmup_init_lr: float = 0.0) -> float:
    """Linear warmup, then the peak LR for ever."""
    _check(warmup_steps, peak_lr, warmup_init_lr)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr, warmup_init_lr)
    return 1.0


def inverse_sqrt(
    step: int,
    *,
    warmup_steps: int,
    peak_lr: float = 1.0,
    warmup_init_lr: float = 0.0,
    timescale: float | None = None,
) -> float:
    """Linear warmup, then `sqrt(timescale / (step - warmup + timescale))` (fairseq, ESM-1b, HF).

    With the default timescale = warmup_steps this is fairseq's `peak * sqrt(warmup / step)`; with no warmup
    the timescale defaults to 10,000 as in HF's `get_inverse_sqrt_schedule`, so step 0 never divides by 0.
    """
    _check(warmup_steps, peak_lr, warmup_init_lr)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr, warmup_init_lr)
    if timescale is None:
        timescale = warmup_steps or 10_000
    if timescale <= 0:
        raise ValueError(f"scheduler.timescale={timescale} must be > 0 (or null for the default)")
    return math.sqrt(timescale / (step - warmup_steps + timescale))


def linear(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    peak_lr: float = 1.0,
    warmup_init_lr: float = 0.0,
    final_lr_ratio: float = 0.0,
    decay_end_fraction: float = 1.0,
) -> float:
    """Linear warmup, linear decay to `final_lr_ratio` at `decay_end_fraction * total_steps`, then flat (ESM-2)."""
    decay_end = decay_end_fraction * total_steps
    return _warmup_then(
        step, warmup_steps, decay_end, peak_lr, warmup_init_lr, lambda p: 1.0 - (1.0 - final_lr_ratio) * p
    )


def cosine(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    peak_lr: float = 1.0,
    warmup_init_lr: float = 0.0,
    final_lr_ratio: float = 0.0,
) -> float:
    """Linear warmup, then half a cosine from the peak down to `final_lr_ratio` at `total_steps`."""

    def half_cosine(progress: float) -> float:
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _warmup_then(step, warmup_steps, total_steps, peak_lr, warmup_init_lr, half_cosine)


def polynomial(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    peak_lr: float = 1.0,
    warmup_init_lr: float = 0.0,
    final_lr_ratio: float = 0.0,
    power: float = 1.0,
) -> float:
    """Linear warmup, then `(1 - progress) ** power` decay to `final_lr_ratio` at `total_steps` (fairseq)."""

    def power_decay(progress: float) -> float:
        return final_lr_ratio + (1.0 - final_lr_ratio) * (1.0 - progress) ** power

    return _warmup_then(step, warmup_steps, total_steps, peak_lr, warmup_init_lr, power_decay)


def lambda_scheduler(optimizer: Optimizer, schedule: Callable[[int], float]) -> LambdaLR:
    """Wrap a `step -> multiplier` function; calling it once first surfaces bad arguments before training."""
    schedule(0)
    return LambdaLR(optimizer, schedule)
