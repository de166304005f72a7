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
    of `max_steps` (or from `decay_start_step`, to branch a decay off any stable-phase checkpoint).
    Shapes: linear (1-p), sqrt (1-sqrt(p), the WSD paper's choice), cosine, exp (e^-5p rescaled to
    reach 0 at p=1).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = decay_start_step if decay_start_step is not None else max_steps - round(decay_fraction * max_steps)
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
