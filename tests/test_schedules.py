"""LR schedules: tables of expected values, closed forms, and Hugging Face's reference implementations."""

import math
from functools import partial

import pytest
import torch
from transformers import (
    get_cosine_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from protein_mlm.training import schedules
from protein_mlm.training.schedules import lambda_scheduler

PEAK = 4e-4


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # with warmup_init_lr = 0 the first update is a no-op
        (1, 0.25),
        (2, 0.5),
        (3, 0.75),
        (4, 1.0),  # warmup done: sqrt(4 / 4)
        (9, math.sqrt(4 / 9)),  # fairseq / the seed: sqrt(warmup / step)
        (16, 0.5),
        (400, 0.1),
    ],
)
def test_inverse_sqrt_table(step, expected):
    assert schedules.inverse_sqrt(step, warmup_steps=4) == pytest.approx(expected)


def test_inverse_sqrt_without_warmup_does_not_divide_by_zero():
    # timescale defaults to 10,000 when warmup is 0 (HF), so step 0 is the peak.
    assert schedules.inverse_sqrt(0, warmup_steps=0) == 1.0
    assert schedules.inverse_sqrt(30_000, warmup_steps=0) == pytest.approx(math.sqrt(10_000 / 40_000))


def test_warmup_init_lr_is_the_lr_of_update_zero():
    f = partial(schedules.inverse_sqrt, warmup_steps=10, peak_lr=PEAK, warmup_init_lr=1e-7)
    assert PEAK * f(0) == pytest.approx(1e-7)
    assert PEAK * f(5) == pytest.approx(1e-7 + (PEAK - 1e-7) * 0.5)
    assert f(10) == 1.0


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.55), (100, 0.1), (150, 0.1)],  # decay ends at 0.9 x 111.1.. = 100
)
def test_linear_esm2_table(step, expected):
    f = partial(schedules.linear, warmup_steps=10, total_steps=1000 / 9, final_lr_ratio=0.1, decay_end_fraction=0.9)
    assert f(step) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (10, 1.0), (60, 0.5), (110, 0.0), (200, 0.0)])
def test_cosine_table(step, expected):
    assert schedules.cosine(step, warmup_steps=10, total_steps=110) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (3, 0.75), (4, 1.0), (10**6, 1.0)])
def test_constant_table(step, expected):
    assert schedules.constant(step, warmup_steps=4) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [(10, 1.0), (60, 0.25), (110, 0.0)])
def test_polynomial_table(step, expected):
    assert schedules.polynomial(step, warmup_steps=10, total_steps=110, power=2.0) == pytest.approx(expected)


def _hf_multipliers(factory, steps):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = factory(optimizer)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("warmup", [0, 1, 7, 50])
def test_inverse_sqrt_equals_hf(warmup):
    expected = _hf_multipliers(partial(get_inverse_sqrt_schedule, num_warmup_steps=warmup), 300)
    ours = [schedules.inverse_sqrt(s, warmup_steps=warmup) for s in range(300)]
    assert ours == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 7, 50])
def test_linear_equals_hf(warmup):
    hf = partial(get_linear_schedule_with_warmup, num_warmup_steps=warmup, num_training_steps=200)
    ours = [schedules.linear(s, warmup_steps=warmup, total_steps=200) for s in range(260)]
    assert ours == pytest.approx(_hf_multipliers(hf, 260), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("warmup", [0, 7, 50])
def test_cosine_equals_hf(warmup):
    hf = partial(get_cosine_schedule_with_warmup, num_warmup_steps=warmup, num_training_steps=200)
    ours = [schedules.cosine(s, warmup_steps=warmup, total_steps=200) for s in range(200)]
    assert ours == pytest.approx(_hf_multipliers(hf, 200), rel=1e-9, abs=1e-12)


def test_polynomial_equals_hf():
    hf = partial(
        get_polynomial_decay_schedule_with_warmup,
        num_warmup_steps=20,
        num_training_steps=200,
        lr_end=0.05,
        power=2.0,
    )
    ours = [
        schedules.polynomial(s, warmup_steps=20, total_steps=200, final_lr_ratio=0.05, power=2.0) for s in range(200)
    ]
    assert ours == pytest.approx(_hf_multipliers(hf, 200), rel=1e-9)


def test_lambda_scheduler_steps_through_the_function():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scheduler = lambda_scheduler(optimizer, partial(schedules.inverse_sqrt, warmup_steps=4))
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([PEAK * schedules.inverse_sqrt(s, warmup_steps=4) for s in range(20)])


@pytest.mark.parametrize(
    ("fn", "kwargs", "message"),
    [
        (schedules.inverse_sqrt, {"warmup_steps": -1}, "negative"),
        (schedules.linear, {"warmup_steps": 100, "total_steps": 50}, "decay ends"),
        (schedules.constant, {"warmup_steps": 1, "peak_lr": 0.0}, "must be > 0"),
    ],
)
def test_bad_arguments_raise(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lambda_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), partial(fn, **kwargs))
