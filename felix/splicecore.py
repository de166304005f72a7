"""SpliceCore: the dedicated, trainable low-rank surface that live edits (splices) write to.

A SpliceCore sits beside one layer's MLP down-projection and reads the same input u (the SwiGLU
hidden, d_ff wide):

    mlp(x) = W_down u + gate * B (A u)

so it is exactly a LoRA on `W_down` with scale `gate` (llama.cpp: `blk.L.ffn_down.weight.lora_a/b`).
Why the down-projection: its input space is where MLP "keys" live and its output is written straight
into the residual stream, which is what ROME/MEMIT-style closed-form edits solve for. B starts at zero
so the model starts as a plain Llama; A and B are trained from step 0 with everything else. `gate` is
a non-trained per-layer scalar that edits may set (0 ablates the layer's SpliceCore).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def splice_tensor_layer(name: str) -> int:
    """The layer of a SpliceCore tensor named `layers.L.mlp.splice.{a,b,gate}`."""
    return int(name.split(".")[1])


class SpliceCore(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.rank = rank
        self.a = nn.Parameter(torch.empty(rank, d_in))
        self.b = nn.Parameter(torch.empty(d_out, rank))
        self.register_buffer("gate", torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A: unit-variance projections of u; B: zero so the surface starts as the identity edit.
        nn.init.normal_(self.a, std=1.0 / math.sqrt(self.a.shape[1]))
        nn.init.zeros_(self.b)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return (u @ self.a.t()) @ (self.b.t() * self.gate.to(self.b.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The dense update this SpliceCore adds to W_down: gate * B @ A (d_out x d_in)."""
        return self.gate * (self.b @ self.a)

    def extra_repr(self) -> str:
        return f"d_in={self.a.shape[1]}, d_out={self.b.shape[0]}, rank={self.rank}"
