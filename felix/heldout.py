"""Held-out text for the splice budget and drift: windows per mix source, weighted as the mix weights them.

Perplexity "on held-out text" is the mix's perplexity: each source's mean next-token NLL, weighted by
the source's share of the mix. A plain mean over whatever windows were at hand would weight a source by
how large its validation split happens to be, and the first 32 windows of the first source (what the
budget read before EXP-46n) are one code file of the demo mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from felix.model import FelixLM

NLL_CHUNK = 16  # windows per forward pass: memory stays flat however many windows --heldout-windows asks for


@dataclass(frozen=True)
class HeldoutText:
    """(n_s, T) token windows per source and the source's weight (the weights sum to 1)."""

    windows: dict[str, torch.Tensor]
    weights: dict[str, float]

    def __post_init__(self) -> None:
        if not self.windows or set(self.windows) != set(self.weights):
            raise ValueError("held-out text needs windows and a weight for the same, non-empty set of sources")
        if not math.isclose(sum(self.weights.values()), 1.0, rel_tol=1e-6):
            raise ValueError(f"held-out source weights must sum to 1, got {self.weights}")

    @classmethod
    def of(cls, tokens: torch.Tensor, source: str = "heldout") -> HeldoutText:
        """One source holding every window."""
        return cls({source: tokens}, {source: 1.0})

    def describe(self) -> dict[str, dict[str, float]]:
        """{source: {windows, tokens, weight}}: what a report records of the text it measured on."""
        return {s: {"windows": len(w), "tokens": w.numel(), "weight": self.weights[s]} for s, w in self.windows.items()}


@torch.no_grad()
def source_nll(model: FelixLM, text: HeldoutText) -> dict[str, float]:
    """Mean next-token NLL of each source's windows."""
    device = model.tok_emb.weight.device
    out = {}
    for name, tokens in text.windows.items():
        total = 0.0
        for chunk in tokens.split(NLL_CHUNK):
            chunk = chunk.to(device)
            total += float(model(chunk[:, :-1], targets=chunk[:, 1:])) * len(chunk)
        out[name] = total / len(tokens)
    return out


def weighted_nll(nll: dict[str, float], text: HeldoutText) -> float:
    """The mix's NLL from its sources' NLLs."""
    return sum(text.weights[s] * v for s, v in nll.items())


def heldout_nll(model: FelixLM, text: HeldoutText | torch.Tensor) -> float:
    """Mix-weighted mean next-token NLL (exp() of it is the perplexity); a bare (B, T) tensor is one source."""
    if isinstance(text, torch.Tensor):
        if text.numel() == 0:
            return float("nan")
        text = HeldoutText.of(text)
    return weighted_nll(source_nll(model, text), text)


def drift_by_source(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """exp(NLL_after - NLL_before) - 1 per source."""
    return {s: math.exp(after[s] - before[s]) - 1.0 for s in before}
