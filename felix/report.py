"""Run reports: the loss plot and greedy samples from a trained run."""

from __future__ import annotations

import math
from pathlib import Path

from felix.atomic import atomic_path
from felix.generate import generate
from felix.metrics import grad_norms, read_metrics
from felix.model_loader import load_model

DEFAULT_PROMPTS = ("def ", "import os\n", "class Parser", '    """Return the', "for i in range(")


def plot_losses(metrics_path: Path, out_png: Path, title: str = "FelixLM training",
                grad_clip: float | None = None) -> Path:
    """Train loss per step and validation loss at each eval, over the gradient norm before clipping, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path}: no metrics to plot")
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    loss = [r["loss"] for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    norms = [(step, g) for step, g in grad_norms(rows) if g > 0]  # a log axis cannot draw 0
    fig, axes = plt.subplots(2 if norms else 1, 1, figsize=(7, 5.5 if norms else 4), dpi=110, sharex=True,
                             squeeze=False, height_ratios=[2, 1] if norms else None)
    ax = axes[0, 0]
    ax.plot(steps, loss, lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", lw=1.5, label="val loss")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if norms:
        gx = axes[1, 0]
        gx.plot(*zip(*norms, strict=True), lw=0.8, color="tab:gray", label="gradient norm (before clipping)")
        if grad_clip is not None and math.isfinite(grad_clip):
            gx.axhline(grad_clip, color="tab:red", lw=0.8, ls="--", label=f"clip at {grad_clip:g}")
        gx.set_yscale("log")
        gx.set_ylabel("gradient norm")
        gx.grid(alpha=0.3)
        gx.legend(fontsize="small")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png


def greedy_samples(checkpoint: Path, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 48) -> list[dict]:
    """Greedy continuations of a few prompts from a checkpoint."""
    model, tok, _ = load_model(checkpoint)
    out = []
    for prompt in prompts:
        ids = generate(model, tok.encode(prompt), max_new_tokens, greedy=True, stop_ids=tok.stop_ids)
        out.append({"prompt": prompt, "completion": tok.decode([t for t in ids if t not in tok.stop_ids])})
    return out
