"""A bound, over every possible input, on how large FelixLM's activations can grow.

Each block reads an RMS-normalized copy of the residual stream, whose norm is at most sqrt(d) * max|w| whatever
the input. So every block's contribution to the residual has a bound that depends on its weights alone
(Frobenius norms are upper bounds on the operator norms used):

    attention:  convex mixes of value vectors  ->  ||W_o|| * sqrt(n_heads / n_kv) * ||W_v|| * N
    MLP:        |silu(z)| <= |z|, so ||u|| <= max_row||W_gate|| * N * ||W_up|| * N; down adds ||W_down|| * ||u||
    SpliceCore: ||A u|| <= ||A|| * ||u||, then |gate| * ||B|| times that

and the residual's norm is at most the largest embedding row's plus the sum of them all. The bound is loose (it
assumes every layer pushes one way at once), but it holds for every prompt, which a probe prompt cannot. It
matters because large residuals fail silently: once the residual's sum of squares overflows float32 (a norm
near 1.8e19), RMSNorm returns zeros and every logit is 0, with nothing non-finite to catch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from felix.model import FelixLM

# how far below float32's overflow of the residual's sum of squares a SpliceCore state must keep its bound (2^10):
# the bound is a guarantee, so the margin covers only rounding (a quantized fold's, summation order)
HEADROOM = float(1 << 10)
LIMIT = math.sqrt(torch.finfo(torch.float32).max) / HEADROOM  # about 1.8e16


def norm64(t: torch.Tensor) -> float:
    """Frobenius norm in float64: a float32 tensor of 1e20s has a norm, though its sum of squares overflows."""
    return float(t.detach().double().norm())


def _row_norm(t: torch.Tensor) -> float:
    """The largest row's norm, in float64."""
    return float(t.detach().double().norm(dim=1).max())


@dataclass(frozen=True)
class SpliceBound:
    """The bound of one SpliceCore state over all inputs."""

    residual: float  # the residual stream's norm, with every SpliceCore as it is
    base: float  # the same without SpliceCore: what the frozen weights alone allow
    splice_out: dict[int, float]  # layer -> the norm its SpliceCore can add to the residual
    splice_mid: dict[int, float]  # layer -> the norm of its rank-r intermediate A u
    splice_scale: dict[int, float]  # layer -> ||gate * B||, which the forward pass forms

    @property
    def frozen_past_limit(self) -> bool:
        """Whether the frozen weights alone pass `LIMIT`: then no SpliceCore state is within it."""
        return not self.base <= LIMIT  # NaN passes it too

    def worst(self) -> tuple[str, float] | None:
        """What passes `LIMIT`, with its bound, None when nothing does: first the frozen weights alone (then no
        SpliceCore state is within it), then a SpliceCore's own product (the most particular), then the
        residual stream."""
        if self.frozen_past_limit:  # no SpliceCore state can help it: say that the cause is the model itself
            return "the residual stream, whatever SpliceCore holds (the frozen weights alone allow it)", self.base
        for layer in sorted(self.splice_mid):
            if not self.splice_mid[layer] <= LIMIT:  # NaN fails too
                return f"layer {layer}'s SpliceCore A·u", self.splice_mid[layer]
            if not self.splice_scale[layer] <= LIMIT:
                return f"layer {layer}'s SpliceCore gate·B", self.splice_scale[layer]
        if not self.residual <= LIMIT:
            return "the residual stream", self.residual
        return None


class ActivationBound:
    """The frozen weights' part of the bound, computed once; `of` adds a SpliceCore state's part."""

    def __init__(self, model: FelixLM):
        cfg = model.cfg

        def normed(norm) -> float:  # the norm of an RMSNorm's output, for any input
            return math.sqrt(cfg.d_model) * float(norm.weight.detach().abs().max())

        with torch.no_grad():
            self.emb = _row_norm(model.tok_emb.weight)
            self.blocks = 0.0
            self.u: dict[int, float] = {}  # SpliceCore layer -> bound on ||u||
            for block in model.layers:
                att, mlp = block.attn, block.mlp
                n = normed(block.attn_norm)
                self.blocks += norm64(att.o_proj.weight) * math.sqrt(att.n_heads / att.n_kv) * norm64(
                    att.v_proj.weight) * n
                n = normed(block.mlp_norm)
                u = _row_norm(mlp.gate_proj.weight) * n * norm64(mlp.up_proj.weight) * n
                self.blocks += norm64(mlp.down_proj.weight) * u
                if mlp.splice is not None:
                    self.u[block.layer] = u

    def of(self, model: FelixLM) -> SpliceBound:
        """The bound with `model`'s SpliceCore state (its frozen weights must be those this was made from)."""
        base = self.emb + self.blocks
        mid, scale, out = {}, {}, {}
        with torch.no_grad():
            for layer, core in model.splice_cores().items():
                mid[layer] = norm64(core.a) * self.u[layer]
                scale[layer] = abs(float(core.gate)) * norm64(core.b)
                out[layer] = scale[layer] * mid[layer]
        return SpliceBound(base + sum(out.values()), base, out, mid, scale)
