"""The one place splice tools re-quantize SpliceCore tensors to the deployment format (RQ4).

The codec is `felix.quant_formats` (`get_format(fmt).fake_quant`: quantize-dequantize, bit-identical to
what the deployment format stores), so the bench's "after RQ4" rates are what a quantized server serves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from felix.quant_formats import get_format


def requantizer(fmt: str = "rq4") -> Callable[[torch.nn.Module], None]:
    """A function that rounds a model's SpliceCore a/b through `fmt` in place (gates stay exact)."""
    fq = get_format(fmt).fake_quant

    def apply(model) -> None:
        state = model.splice_state()
        model.load_splice_state({k: fq(v.float()).to(v.dtype) for k, v in state.items() if not k.endswith("gate")},
                                strict=False)

    return apply
