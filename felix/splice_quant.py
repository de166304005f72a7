"""The one place splice tools re-quantize SpliceCore tensors to the deployment format (RQ4).

The RQ4 codec lives in `felix.quant_formats` (another part of the project). Until it exists,
`requantizer()` returns None and the bench reports RQ4 survival as pending.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

# Names the codec module may give its fake-quant (quantize then dequantize) entry point.
_FAKE_QUANT_NAMES = ("fake_quant", "fake_quantize", "rq4_fake_quant", "fake_quant_rq4")


def _codec() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        mod = importlib.import_module("felix.quant_formats")
    except ModuleNotFoundError as exc:
        if exc.name == "felix.quant_formats":
            return None
        raise
    for name in _FAKE_QUANT_NAMES:
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    return None


def requantizer() -> Callable[[torch.nn.Module], None] | None:
    """A function that rounds a model's SpliceCore a/b through RQ4 in place, or None when unavailable."""
    fq = _codec()
    if fq is None:
        return None

    def apply(model) -> None:
        state = model.splice_state()
        model.load_splice_state({k: fq(v.float()).to(v.dtype) for k, v in state.items() if not k.endswith("gate")},
                                strict=False)

    return apply
