"""The one place SpliceCore tensors are re-quantized to a deployment format (RQ4).

The rule is `felix quantize`'s (`felix.quantize.tensor_encoding`): 2-D tensors of at least 1024
elements go through the format, smaller ones are rounded through fp16, the gate stays fp32. Three ways
to round the block-quantized ones, all ending on the format's grid (`fake_quant` of the result is the
result, so any later re-quantization keeps it):

- plain (`requantize_splice`, `requantizer`): each weight to its nearest grid value. This is what
  `felix quantize --splice-rounding plain`, an export and a quantized server's tensor push (by default) do.
- GPTQ (`gptq_requantizer`, `felix.quant_gptq`), weighted by the inputs each tensor sees: the
  preservation text's down-projection inputs u and the applied edits' own keys. Layer by layer,
  bottom up (a layer's inputs are read with the layers below already rounded), per layer:

      H   = (1 - s) C / tr C + s K Kᵀ / tr(K Kᵀ)     C = E[u uᵀ] over text, K = u at the edits' targets
      a_q = gptq(a, H)
      b'  = b (a H a_qᵀ)(a_q H a_qᵀ)⁻¹                 least-squares refit: b' a_q u ≈ b a u under H
      b_q = gptq(b', a_q H a_qᵀ)

  s (`edit_share`) is the share of H's weight on the edit keys (docs/experiments/EXP-46h).
- GPTQ one pushed tensor at a time (`PushRounding`, `felix serve --push-rounding gptq`): the same H, with
  the keys of the server's own stack, and no refit (EXP-46s).

On a quantized artifact, edits made with `felix splice apply` stay unrounded in the patch stack and the
whole stack is rounded once, as `gptq_requantizer` rounds it, wherever the artifact is served
(`felix.splice_fold`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from felix.errors import FelixError
from felix.quant_formats import FORMATS, CodebookFormat, QuantError, get_format
from felix.quant_gptq import gptq_round
from felix.quantize import round_as_stored, tensor_encoding
from felix.splice_covariance import BottomUpCovariances, InputCovariances, inputs_at_targets
from felix.splicecore import splice_tensor_layer

FP32_FORMATS = (None, "", "f32", "fp32")
GPTQ_FORMATS = tuple(name for name, f in FORMATS.items() if isinstance(f, CodebookFormat))  # rq4, rq3, nf4


def requantize_splice(name: str, tensor: torch.Tensor, fmt: str | None) -> torch.Tensor:
    """A SpliceCore tensor as the deployment format stores it (quantize, then dequantize); plain rounding.

    fp32 serving is the identity. Quantized serving applies `felix quantize`'s per-tensor rule, so the
    served model computes what a re-exported artifact would.
    """
    if fmt in FP32_FORMATS:
        return tensor
    # an edit must never be served as inf weights: a finite value the stored form cannot hold is refused
    return round_as_stored(name, tensor, tensor_encoding(name, tuple(tensor.shape), fmt))


def unstorable(state: dict[str, torch.Tensor], fmt: str, before: dict[str, torch.Tensor] | None = None) -> str | None:
    """Why `fmt` cannot store SpliceCore tensors `state` as `requantize_splice` rounds them (a block scale, or a
    value kept in fp16, past its range), naming the first such tensor; None when it can. A tensor whose value in
    `before` could not be stored either (its shape does not fit the format) is not counted: no write made it so."""
    before = before or {}
    for name in sorted(state):
        why = _why_not(name, state[name], fmt)
        if why is not None and (name not in before or _why_not(name, before[name], fmt) is None):
            return why
    return None


def _why_not(name: str, tensor: torch.Tensor, fmt: str) -> str | None:
    """The QuantError `requantize_splice` raises for `tensor`, as text; None when it stores it."""
    try:
        requantize_splice(name, tensor, fmt)
    except QuantError as exc:
        return str(exc)
    return None


def deployment_format(ckpt) -> tuple[str, str | None]:
    """The format a checkpoint's SpliceCore is meant to be stored in, and what says so; None: nothing does, and
    the format is RQ4, the deployment format `felix splice bench` re-quantizes to.

    A `felix quantize` artifact is in its own format. A training checkpoint records no deployment format, save one
    trained with QUAIL (`quail.enabled`), whose margin loss kept its tokens' lead above `quail.format`'s rounding
    noise: a run made for that format."""
    if ckpt.quant_format:
        return ckpt.quant_format, f"it is a `felix quantize` artifact in {ckpt.quant_format}"
    quail = ckpt.config.quail
    if quail.enabled:
        return quail.format, f"it was trained for {quail.format} deployment (quail.enabled, quail.format)"
    return "rq4", None


def requantizer(fmt: str = "rq4") -> Callable[[torch.nn.Module], None]:
    """A function that rounds a model's SpliceCore tensors through `fmt` in place, plainly."""
    get_format(fmt)

    def apply(model) -> None:
        model.load_splice_state({k: requantize_splice(k, v, fmt) for k, v in model.splice_state().items()},
                                strict=False)

    return apply


def edit_weighted_covariance(text_cov: torch.Tensor, edit_keys: torch.Tensor, edit_share: float) -> torch.Tensor:
    """(1 - s) C / tr C + s K Kᵀ / tr(K Kᵀ): the text's input moments with share s moved onto the edit keys."""
    h = text_cov.double() / max(float(text_cov.trace()), 1e-30)
    if edit_keys.shape[1] == 0 or edit_share == 0:
        return h
    kk = edit_keys.double() @ edit_keys.double().t()
    return (1 - edit_share) * h + edit_share * kk / max(float(kk.trace()), 1e-30)


def _input_moment(covariances, model, layer: int, edits: Sequence, edit_share: float) -> torch.Tensor:
    """H of layer L's `a`: the preservation text's input moments, share `edit_share` moved onto the edits' keys."""
    cov = covariances.get(model, [layer])[layer]
    return edit_weighted_covariance(cov, inputs_at_targets(model, [layer], list(edits))[layer], edit_share)


def _gptq_or_plain(name: str, weight: torch.Tensor, h: torch.Tensor, fmt: str, damp: float) -> torch.Tensor:
    """`weight` GPTQ-rounded under input moments `h` if the format quantizes it, else by `requantize_splice`."""
    if tensor_encoding(name, tuple(weight.shape), fmt) == fmt:
        try:  # gptq_round refuses a block scale that overflows, before and during its error feedback
            return gptq_round(weight, h, get_format(fmt), damp)
        except QuantError as exc:
            raise QuantError(f"tensor {name}: {exc}") from None
    return requantize_splice(name, weight, fmt)


def gptq_requantizer(preserve: torch.Tensor, edits: Sequence = (), fmt: str = "rq4", edit_share: float = 0.5,
                     damp: float = 0.01) -> Callable[..., dict[int, list[torch.Tensor]] | None]:
    """A function that GPTQ-rounds a model's SpliceCore a/b onto `fmt`'s grid in place, weighted by the
    preservation windows `preserve` (token ids) and the edits' keys (`Example`s; gates stay exact)."""
    if not 0 <= edit_share < 1:
        raise ValueError(f"edit_share must be in [0, 1), got {edit_share}")
    get_format(fmt)

    def apply(model, start: int = 0, entering: list[torch.Tensor] | None = None,
              record: bool = False) -> dict[int, list[torch.Tensor]] | None:
        """Round `model`'s SpliceCore. From `start` on: layers below it are left as they are (rounded by an
        earlier fold), read through `entering`, the residual stream entering block `start` as that fold
        recorded it. `record`: return, per folded layer, the residual stream entering its block."""
        cores = model.splice_cores()
        text = BottomUpCovariances(model, preserve, entering, start, record)
        for layer in sorted(k for k in cores if k >= start):  # bottom up: inputs read through rounded layers
            core = cores[layer]
            name = f"layers.{layer}.mlp.splice."
            keys = inputs_at_targets(model, [layer], list(edits))[layer]
            h = edit_weighted_covariance(text.covariance(layer), keys, edit_share)
            a, b = core.a.detach().double().cpu(), core.b.detach().double().cpu()
            a_q = _gptq_or_plain(name + "a", a, h, fmt, damp).double()
            cross, own = a @ h @ a_q.t(), a_q @ h @ a_q.t()
            if float(own.trace()) > 0:
                ridge = 1e-9 * float(own.trace()) * torch.eye(own.shape[0], dtype=torch.float64)
                b_fit = torch.linalg.solve(own + ridge, (b @ cross).t()).t()  # own is symmetric
                b_q = _gptq_or_plain(name + "b", b_fit, own, fmt, damp)
            else:  # a_q reads nothing (an `a` of zeros): no output of b to fit it to or weigh its rounding by
                b_q = requantize_splice(name + "b", b.float(), fmt)
            with torch.no_grad():
                core.a.copy_(a_q.to(core.a.dtype))
                core.b.copy_(b_q.to(core.b.dtype))
        return text.entering

    return apply


def on_grid(state: dict[str, torch.Tensor], fmt: str | None) -> bool:
    """Whether every SpliceCore tensor in `state` is already what `fmt` stores (so serving it rounds nothing)."""
    return all(torch.equal(requantize_splice(k, v, fmt), v) for k, v in state.items())


class PushRounding:
    """GPTQ rounding of SpliceCore tensors pushed one at a time into a model served in a codebook format.

    A push is one tensor with no edit keys attached, so it is weighted by what the served model reads:

    - `a` of layer L with H = (1 - s) C / tr C + s K Kᵀ / tr(K Kᵀ), C = E[u uᵀ] over the preservation
      windows read through the served model, K the keys at L of `edits` (the stack's fact edits; none:
      H = C / tr C);
    - `b` of layer L with H's image a H aᵀ under L's current `a`.

    Unlike `gptq_requantizer`, `b` is not refit to the rounded `a`: with the text alone in H the refit fits
    `b` to the text and gives up 3-4 edits in 100 (EXP-46s). The gate and the tensors the format leaves
    unquantized follow `requantize_splice`.
    """

    def __init__(self, preserve: torch.Tensor, fmt: str = "rq4", edit_share: float = 0.5, damp: float = 0.01):
        if fmt not in GPTQ_FORMATS:
            raise FelixError(f"GPTQ push rounding needs a codebook format ({', '.join(GPTQ_FORMATS)}), not {fmt}")
        self.fmt, self.format = fmt, get_format(fmt)
        self.edit_share, self.damp = edit_share, damp
        self.covariances = InputCovariances(preserve)

    def input_moment(self, model, layer: int, edits: Sequence = ()) -> torch.Tensor:
        """H of layer L's `a`: the text's input moments, share `edit_share` moved onto the edits' keys."""
        return _input_moment(self.covariances, model, layer, edits, self.edit_share)

    def __call__(self, model, name: str, tensor: torch.Tensor, edits: Sequence = ()) -> torch.Tensor:
        """`tensor`, pushed as `name`, on the format's grid; `model` holds the state it will replace."""
        layer, kind = splice_tensor_layer(name), name.rsplit(".", 1)[1]
        if kind == "gate" or tensor_encoding(name, tuple(tensor.shape), self.fmt) != self.fmt:
            return requantize_splice(name, tensor, self.fmt)  # no forward pass for what GPTQ would not round
        h = self.input_moment(model, layer, edits)
        if kind == "b":
            a = model.splice_cores()[layer].a.detach().double().cpu()
            h = a @ h @ a.t()
        return _gptq_or_plain(name, tensor.double(), h, self.fmt, self.damp)
