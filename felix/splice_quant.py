"""The one place splice tools re-quantize SpliceCore tensors to the deployment format (RQ4).

The RQ4 codec lives in `felix.quant_formats` (`get_format("rq4").fake_quant`: quantize-dequantize,
bit-identical to what the deployment format stores). Where that module is missing, `requantizer()`
returns None and the bench reports RQ4 survival as pending.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch


def _codec(fmt: str = "rq4") -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        mod = importlib.import_module("felix.quant_formats")
    except ModuleNotFoundError as exc:
        if exc.name == "felix.quant_formats":
            return None
        raise
    return mod.get_format(fmt).fake_quant


def requantizer(fmt: str = "rq4") -> Callable[[torch.nn.Module], None] | None:
    """A function that rounds a model's SpliceCore a/b through `fmt` in place, or None when unavailable."""
    fq = _codec(fmt)
    if fq is None:
        return None

    def apply(model) -> None:
        state = model.splice_state()
        model.load_splice_state({k: fq(v.float()).to(v.dtype) for k, v in state.items() if not k.endswith("gate")},
                                strict=False)

    return apply
