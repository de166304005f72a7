"""Model-level quantization: which tensors, packing a whole state dict, size accounting, fake quant.

Policy (the brief §4, as the production fork applies RQ4):
- every 2-D weight with >= 1024 elements takes the format, SpliceCore `a`/`b` included;
- the token embedding (tied with the output head) follows `embeddings`: "quantize" (the format, as the
  fork does), "q8_0", or "keep" (fp16);
- other 2-D tensors (smaller than 1024 elements: only tiny test models have them) are kept as fp16,
  the dtype an unquantized llama.cpp matrix has;
- 1-D and 0-D tensors (RMSNorm weights, the SpliceCore gate) are kept in fp32: they are a few KB
  and the gate is a scalar that edits set.
A selected tensor whose element count is not a multiple of the block is an error naming the tensor
(every packaged config satisfies it: d_model, d_ff and vocab are multiples of 64, and rank x d_model).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from felix.config import ModelConfig
from felix.errors import FelixError
from felix.llama_memory import KV_CONTEXT, N_UBATCH, VRAM_CAP_BYTES, kv_cells, runtime_buffers, ubatch_used
from felix.model import FelixLM
from felix.quant_formats import FORMATS, QuantError, get_format

EMBEDDING = "tok_emb.weight"
EMBEDDING_POLICIES = ("quantize", "q8_0", "keep")
MIN_QUANT_NUMEL = 1024
KEPT = {"f16": torch.float16, "f32": torch.float32}  # encodings of tensors that are not block-quantized


def tensor_encoding(name: str, shape: tuple[int, ...], fmt: str, embeddings: str = "quantize") -> str:
    """The encoding `name` gets: a format name from FORMATS, "f16" or "f32"."""
    if embeddings not in EMBEDDING_POLICIES:
        raise FelixError(f"unknown embedding policy {embeddings!r} (known: {', '.join(EMBEDDING_POLICIES)})")
    get_format(fmt)
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) != 2:
        return "f32"
    if name == EMBEDDING:
        return {"quantize": fmt, "q8_0": "q8_0", "keep": "f16"}[embeddings]
    return fmt if numel >= MIN_QUANT_NUMEL else "f16"


def round_as_stored(name: str, tensor: torch.Tensor, enc: str) -> torch.Tensor:
    """`tensor` (in its dtype) as encoding `enc` (FORMATS or KEPT) stores it.

    A finite value the stored form cannot hold (a block whose scale overflows, a value past the kept dtype's
    range) is a QuantError naming the tensor and the encoding; NaN/inf stay as they are, the caller's to see.
    """
    if enc in FORMATS:
        try:
            return FORMATS[enc].fake_quant(tensor, strict=True)
        except QuantError as exc:
            raise QuantError(f"tensor {name}: {exc}") from None
    rounded = tensor.to(KEPT[enc])
    overflowed = torch.isfinite(tensor) & ~torch.isfinite(rounded)  # per value, as strict is per block
    if overflowed.any():
        raise QuantError(f"tensor {name}: |value| up to {float(tensor[overflowed].abs().max()):.4g} overflows "
                         f"{enc} (the type this tensor is stored in, range ±{torch.finfo(KEPT[enc]).max:.6g})")
    return rounded.to(tensor.dtype)


def quant_plan(state: Mapping[str, torch.Tensor], fmt: str, embeddings: str = "quantize") -> dict[str, str]:
    """Encoding per tensor name, checked: block-quantized tensors must fill whole blocks."""
    plan = {}
    for name, t in state.items():
        enc = tensor_encoding(name, tuple(t.shape), fmt, embeddings)
        if enc in FORMATS and t.numel() % FORMATS[enc].block:
            raise FelixError(f"{name}: shape {tuple(t.shape)} has {t.numel()} elements, not a multiple of the "
                             f"{enc} block size {FORMATS[enc].block}")
        plan[name] = enc
    return plan


@dataclass
class PackedTensor:
    """One tensor as stored: packed uint8 bytes for a format, or an fp16/fp32 copy for kept tensors."""

    shape: tuple[int, ...]
    encoding: str
    data: torch.Tensor

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def dequantize(self) -> torch.Tensor:
        if self.encoding in KEPT:
            return self.data.float().reshape(self.shape)
        return FORMATS[self.encoding].dequantize(self.data, self.shape)


def check_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """FelixError naming missing, unexpected or mis-shaped tensors against a FelixLM of `cfg`."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FelixLM(cfg).state_dict().items()}
    problems = [f"missing tensor {k}" for k in expected if k not in state]
    problems += [f"unexpected tensor {k}" for k in state if k not in expected]
    problems += [f"tensor {k} has shape {tuple(v.shape)}, the config wants {expected[k]}"
                 for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FelixError(f"{source}: weights do not match the config: " + "; ".join(problems[:5]) + more)


def check_finite(state: Mapping[str, torch.Tensor], source: str, action: str = "quantize") -> None:
    """FelixError naming the first tensor that holds NaN or inf (`action`: what is refused)."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise FelixError(f"{source}: tensor {name} has {bad} NaN/inf values; refusing to {action}")


def pack_state(state: Mapping[str, torch.Tensor], fmt: str, embeddings: str = "quantize",
               source: str = "weights") -> dict[str, PackedTensor]:
    """Quantize a whole state dict (names in order) into PackedTensors; everything is checked first."""
    plan = quant_plan(state, fmt, embeddings)
    check_finite(state, source)
    out = {}
    for name, t in state.items():
        enc = plan[name]
        if enc in KEPT:
            data = t.detach().to(KEPT[enc], copy=True).contiguous()
            if enc == "f16" and not torch.isfinite(data).all():
                raise FelixError(f"{source}: tensor {name} has values beyond fp16's range (±65504)")
        else:
            try:
                data = FORMATS[enc].quantize(t)
            except ValueError as exc:
                raise FelixError(f"{source}: tensor {name}: {exc}") from None
        out[name] = PackedTensor(tuple(t.shape), enc, data)
    return out


def unpack_state(packed: Mapping[str, PackedTensor]) -> dict[str, torch.Tensor]:
    """fp32 state dict from PackedTensors (what a dequantizing loader gives the model)."""
    return {name: p.dequantize() for name, p in packed.items()}


def size_report(packed: Mapping[str, PackedTensor], cfg: ModelConfig, fmt: str, context: int = KV_CONTEXT,
                n_ubatch: int = N_UBATCH, flash_attn: bool = False) -> dict:
    """Exact byte accounting: per encoding, over quantized tensors, overall, and deployment memory
    (weights + fp16 KV cache at `context` positions + llama.cpp's compute and output buffers, estimated by
    `felix.llama_memory` for a run with `n_ubatch` and flash attention on or off).

    `params` counts every stored value (parameters and the SpliceCore gate buffers)."""
    by_enc: dict[str, dict[str, int]] = {}
    for p in packed.values():
        row = by_enc.setdefault(p.encoding, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += p.numel
        row["bytes"] += p.nbytes
    quant = [p for p in packed.values() if p.encoding in FORMATS]
    q_params, q_bytes = sum(p.numel for p in quant), sum(p.nbytes for p in quant)
    params, total = sum(p.numel for p in packed.values()), sum(p.nbytes for p in packed.values())
    buffers = runtime_buffers(cfg, context, n_ubatch, flash_attn)
    deployment = total + sum(buffers.values())
    return {
        "format": fmt,
        "params": params,
        "weight_bytes": total,
        "bits_per_weight": 8 * total / params,
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "quantized_bits_per_weight": 8 * q_bytes / q_params if q_params else None,
        "by_encoding": by_enc,
        "fp32_weight_bytes": 4 * params,
        "kv_context": context,
        "kv_cells": kv_cells(context),
        "n_ubatch": ubatch_used(n_ubatch, context),  # what the compute buffer is for
        "flash_attn": flash_attn,
        **buffers,
        "deployment_bytes": deployment,
        "vram_cap_bytes": VRAM_CAP_BYTES,
        "fits_vram_cap": deployment <= VRAM_CAP_BYTES,
    }


# -- fake quantization for evaluation and training ------------------------------------------------
def quantizable_params(model: nn.Module, fmt: str, embeddings: str = "quantize") -> list[tuple[str, str]]:
    """(parameter name, format) for every parameter the policy block-quantizes."""
    plan = quant_plan(dict(model.named_parameters()), fmt, embeddings)
    return [(name, enc) for name, enc in plan.items() if enc in FORMATS]


@torch.no_grad()
def fake_quantize_model(model: nn.Module, fmt: str, embeddings: str = "quantize") -> nn.Module:
    """A copy of `model` whose weights are quantize-dequantized as deployment would see them.

    Kept tensors are rounded through their stored dtype too (fp16 matrices), so the copy computes
    exactly what a model loaded from the packed artifact computes. A finite tensor its stored form cannot
    hold (a block scale or an fp16 value that overflows) is a QuantError (a FelixError) naming it, as
    `pack_state` says.
    """
    out = copy.deepcopy(model)
    plan = quant_plan(dict(out.state_dict()), fmt, embeddings)
    params = dict(out.named_parameters()) | dict(out.named_buffers())
    for name, enc in plan.items():
        params[name].copy_(round_as_stored(name, params[name], enc))
    return out


class _FakeQuant(nn.Module):
    """Parametrization: the weight as the format stores it, straight-through or not."""

    def __init__(self, fmt: str, ste: bool, name: str):
        super().__init__()
        self.fmt, self.ste, self.name = fmt, ste, name

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.ste:  # the training path: no check, which would stop a GPU per weight (fake_quant_ste)
            return FORMATS[self.fmt].fake_quant_ste(w)
        return round_as_stored(self.name, w, self.fmt)  # strict: else the evaluation runs on inf weights


@contextlib.contextmanager
def fake_quantized(model: nn.Module, fmt: str, embeddings: str = "quantize", ste: bool = True) -> Iterator[nn.Module]:
    """Run `model` in place with its quantizable weights fake-quantized on every access.

    With `ste=True` (quantization-aware training) the forward pass sees quantized weights and the
    gradient reaches the full-precision weights unchanged. The Parameter objects stay the same, so an
    optimizer built before keeps working; the parametrizations are removed on exit (do not save
    checkpoints inside: state_dict names change while they are registered). Tied weights (the
    embedding, which is also the output head) are quantized wherever they are used. Only
    block-quantized tensors are touched (the fp16 rounding of kept matrices is left out), and the
    weights are re-quantized at every access: wrap evaluation in `parametrize.cached()` to do it once.
    """
    targets = quantizable_params(model, fmt, embeddings)
    modules = dict(model.named_modules())
    done: list[tuple[nn.Module, str]] = []
    try:
        for name, enc in targets:
            mod_name, _, attr = name.rpartition(".")
            module = modules[mod_name]
            parametrize.register_parametrization(module, attr, _FakeQuant(enc, ste, name), unsafe=True)
            done.append((module, attr))
        yield model
    finally:
        for module, attr in reversed(done):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
