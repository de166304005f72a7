"""The run report's gradient-norm summary and loss plot."""

from __future__ import annotations

import json
import math

from felix.demo import _grad_norm_row
from felix.metrics import grad_norm_summary
from felix.report import plot_losses


def test_grad_norm_summary_counts_clipped_steps_and_skips_non_finite_norms():
    rows = [{"step": 1, "loss": 3.0, "grad_norm": 0.5}, {"step": 2, "loss": 2.9, "grad_norm": 2.0},
            {"step": 3, "loss": 2.8, "grad_norm": math.inf, "skipped": "non-finite"},
            {"step": 4, "loss": 2.8, "grad_norm": None, "skipped": "non-finite"},  # as metrics.jsonl writes inf
            {"step": 5, "loss": 2.7, "grad_norm": 0.8}, {"step": 6, "val_loss": 2.6}]
    g = grad_norm_summary(rows, grad_clip=1.0)
    assert g == {"median": 0.8, "clip": 1.0, "clipped": 1, "steps": 3, "max": 2.0, "max_step": 2}
    assert _grad_norm_row(g) == ("| gradient norm | median 0.8 before clipping; 1 of 3 steps clipped at 1 (33.3%); "
                                 "largest 2 at step 2 |")
    assert "no clipping" in _grad_norm_row(grad_norm_summary(rows, grad_clip=math.inf))
    assert grad_norm_summary([{"step": 1, "val_loss": 2.0}], 1.0) is None


def test_loss_plot_draws_the_gradient_norm_when_the_metrics_have_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 4.0 / s, "grad_norm": 1.5 / s}) + "\n"
                               for s in range(1, 21)))
    with_norm = plot_losses(metrics, tmp_path / "a.png", grad_clip=1.0).read_bytes()
    metrics.write_text("".join(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in range(1, 21)))
    without = plot_losses(metrics, tmp_path / "b.png").read_bytes()
    assert with_norm[:8] == without[:8] == b"\x89PNG\r\n\x1a\n"
    # the PNG's height (IHDR bytes 20..24): the norm's panel makes the figure 5.5 in tall instead of 4
    assert int.from_bytes(with_norm[20:24], "big") > int.from_bytes(without[20:24], "big")
