"""The WSD learning-rate schedule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix.schedule import wsd_schedule

SHAPES = ["linear", "sqrt", "cosine", "exp"]


def test_warmup_stable_decay_phases():
    lrs = [wsd_schedule(s, 100, 10, 0.2, "linear") for s in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10:80] == [1.0] * 70
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[99] == pytest.approx(0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_decay_reaches_min_lr_ratio(shape):
    assert wsd_schedule(99, 100, 10, 0.2, shape, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert wsd_schedule(79, 100, 10, 0.2, shape, min_lr_ratio=0.1) == 1.0


def test_decay_can_branch_from_any_stable_step():
    # the same stable phase, decayed from step 50 over 10 steps instead of the default last 20%
    assert wsd_schedule(49, 60, 5, 0.2, "linear", decay_start_step=50) == 1.0
    assert wsd_schedule(54, 60, 5, 0.2, "linear", decay_start_step=50) == pytest.approx(0.5)
    assert wsd_schedule(59, 60, 5, 0.2, "linear", decay_start_step=50) == pytest.approx(0.0)


def test_sqrt_decays_faster_early_than_linear():
    assert wsd_schedule(82, 100, 10, 0.2, "sqrt") < wsd_schedule(82, 100, 10, 0.2, "linear")


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown decay shape"):
        wsd_schedule(95, 100, 10, 0.2, "step")


@given(st.integers(2, 500), st.integers(0, 50), st.floats(0.0, 1.0), st.sampled_from(SHAPES), st.floats(0.0, 0.5))
def test_schedule_is_bounded_and_monotone_after_warmup(max_steps, warmup, frac, shape, floor):
    warmup = min(warmup, max_steps - 1)
    lrs = [wsd_schedule(s, max_steps, warmup, frac, shape, floor) for s in range(max_steps)]
    assert all(floor - 1e-12 <= x <= 1.0 + 1e-12 for x in lrs[warmup:])
    assert all(0 < x <= 1.0 for x in lrs[:warmup])
    assert all(b <= a + 1e-12 for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))


@pytest.mark.parametrize("shape", SHAPES)
def test_a_decay_longer_than_the_steps_after_warmup_starts_where_warmup_ends(shape):
    # the last 80% of 100 steps would begin at step 20, inside a 50-step warmup
    lrs = [wsd_schedule(s, 100, 50, 0.8, shape, 0.1) for s in range(100)]
    assert lrs[49] == 1.0
    # the first post-warmup step is the first of a 50-step decay, not the 31st of an 80-step one
    assert lrs[50] == pytest.approx(wsd_schedule(0, 50, 0, 1.0, shape, 0.1))
    assert lrs[99] == pytest.approx(0.1)


@pytest.mark.parametrize("shape", SHAPES)
def test_any_positive_decay_fraction_ends_at_min_lr(shape):
    # 4% of 10 steps rounds to no step at all; a configured decay still takes the last one
    assert wsd_schedule(9, 10, 2, 0.04, shape, 0.1) == pytest.approx(0.1)
    assert wsd_schedule(8, 10, 2, 0.04, shape, 0.1) == 1.0
    assert wsd_schedule(9, 10, 2, 0.0, shape, 0.1) == 1.0  # fraction 0: no decay


@given(st.integers(2, 500), st.integers(0, 50), st.floats(0.001, 1.0), st.sampled_from(SHAPES), st.floats(0.0, 0.5))
def test_the_last_step_is_at_min_lr_and_the_decay_never_starts_inside_warmup(max_steps, warmup, frac, shape,
                                                                             floor):
    warmup = min(warmup, max_steps - 1)
    lrs = [wsd_schedule(s, max_steps, warmup, frac, shape, floor) for s in range(max_steps)]
    assert lrs[-1] == pytest.approx(floor)
    if warmup:
        assert lrs[warmup - 1] == 1.0
        # one decay step of the longest possible decay (every step after warmup) is the most it may drop
        assert lrs[warmup] >= wsd_schedule(0, max_steps - warmup, 0, 1.0, shape, floor) - 1e-12
