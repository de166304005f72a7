"""Warmup-stable-decay (WSD) learning-rate schedule."""

from __future__ import annotations

import math


def wsd_schedule(
    step: int,
    max_steps: int,
    warmup_steps: int,
    decay_fraction: float,
    shape: str = "sqrt",
    min_lr_ratio: float = 0.0,
    decay_start_step: int | None = None,
) -> float:
    """LR multiplier in [min_lr_ratio, 1] for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps`, then constant, then a decay over the last `decay_fraction`
    of `max_steps` (at least one step when the fraction is > 0, and never before the warmup ends), or
    from `decay_start_step`, to branch a decay off any stable-phase checkpoint.
    Shapes: linear (1-p), sqrt (1-sqrt(p), the WSD paper's choice), cosine, exp (e^-5p rescaled to
    reach 0 at p=1).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_start_step is not None:
        start = decay_start_step
    else:
        n_decay = round(decay_fraction * max_steps)
        if decay_fraction > 0:
            n_decay = max(n_decay, 1)  # a configured decay, however short, ends at min_lr_ratio
        # A decay longer than the steps after warmup starts where warmup ends: starting it inside the
        # warmup would drop the lr from the peak straight to the decay's value there.
        start = max(max_steps - n_decay, warmup_steps)
    if step < start or max_steps <= start:
        return 1.0
    p = min(1.0, (step - start + 1) / (max_steps - start))
    if shape == "linear":
        f = 1.0 - p
    elif shape == "sqrt":
        f = 1.0 - math.sqrt(p)
    elif shape == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif shape == "exp":
        f = (math.exp(-5.0 * p) - math.exp(-5.0)) / (1.0 - math.exp(-5.0))
    else:
        raise ValueError(f"unknown decay shape {shape!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * f
