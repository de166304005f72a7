"""Deployment memory of a GGUF export, from the model config alone: what llama.cpp allocates to serve it.

weights + f16 KV cache + f32 SpliceCore adapter + llama.cpp's compute and output buffers. The weight bytes
follow the export's own per-tensor type rule (`felix.export_gguf.tensor_type`), so the estimate and the file
agree (up to GGUF's 32-byte tensor alignment and the metadata); the KV cache holds the context padded as
llama.cpp pads it (`felix.quantize.kv_cells`). Left out: scratch a backend keeps outside its compute buffer
(the CPU backend's work buffer, CUDA's memory pool: without flash attention the KQ x V product can take an
f16 copy of KQ there, up to half the KQ term again) and the logits rows of parallel sequences beyond the first.
"""

from __future__ import annotations

import math

from felix.config import ModelConfig, load_config
from felix.errors import FelixError
from felix.export_gguf import BYTES_PER_WEIGHT, DTYPES, adapter_shapes, gguf_shapes, tensor_type
from felix.llama_memory import (
    KV_CONTEXT,
    N_UBATCH,
    VRAM_CAP_BYTES,
    kv_cells,
    llama_assumptions,
    runtime_buffers,
    ubatch_used,
)


def weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of the base GGUF's tensors (SpliceCore merged or not: the shapes are the same)."""
    total = 0.0
    for shape in gguf_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n * BYTES_PER_WEIGHT[tensor_type(shape, dtype)]
    return int(total)


def adapter_bytes(cfg: ModelConfig) -> int:
    """Bytes of the SpliceCore LoRA adapter (f32)."""
    return sum(r * c * 4 for r, c in adapter_shapes(cfg).values())


def deployment_memory(cfg: ModelConfig, context: int = KV_CONTEXT, n_ubatch: int = N_UBATCH,
                      flash_attn: bool = False, adapter: bool = True) -> dict[str, dict]:
    """Per dtype: weights, KV cache, adapter (none without `adapter`), llama.cpp's buffers, their total, and
    whether it fits the 4 GiB cap."""
    buffers = runtime_buffers(cfg, context, n_ubatch, flash_attn)
    adapter = adapter_bytes(cfg) if adapter else 0
    out = {}
    for dtype in DTYPES:
        weights = weight_bytes(cfg, dtype)
        total = weights + adapter + sum(buffers.values())
        out[dtype] = {"weights_bytes": weights, "adapter_bytes": adapter, **buffers,
                      "total_bytes": total, "fits_cap": total <= VRAM_CAP_BYTES}
    return out


def memory_report(own: ModelConfig | None = None, configs: tuple[str, ...] = ("felix-300m", "felix-500m"),
                  context: int = KV_CONTEXT, n_ubatch: int = N_UBATCH, flash_attn: bool = False,
                  adapter: bool = True) -> dict:
    """Deployment memory at `context` positions of the packaged configs (and of the exported model, as
    `this_model`); `adapter=False` for a deployment with SpliceCore merged and no adapter (an HF export)."""
    report = {name: deployment_memory(load_config(name).model, context, n_ubatch, flash_attn, adapter)
              for name in configs}
    if own is not None:
        report["this_model"] = deployment_memory(own, context, n_ubatch, flash_attn, adapter)
    with_adapter = " + f32 SpliceCore adapter" if adapter else ""
    used = ubatch_used(n_ubatch, context)  # what the figures are for: a larger ubatch is capped at the context
    return {"runtime": "llama.cpp", "context": context, "kv_cells": kv_cells(context), "n_ubatch": used,
            "flash_attn": flash_attn, "kv_cache_dtype": "f16", "cap_bytes": VRAM_CAP_BYTES, "adapter": adapter,
            "assumes": f"weights + f16 KV cache{with_adapter} + llama.cpp's compute and output "
                       f"buffers; {llama_assumptions(used, flash_attn)}; backend scratch outside them excluded",
            "models": report}


# bytes per value of the dtypes a transformers user loads the HF export in: as written, or halved
HF_DTYPES = {"float32": 4, "bfloat16": 2}


def hf_memory(cfg: ModelConfig, context: int | None = None) -> dict:
    """What transformers holds to run the HF export of `cfg` at `context` positions (default: its max_seq_len,
    the export's model_max_length), batch 1: the weights in the dtype they are loaded in (float32 as written;
    bfloat16 with `dtype=torch.bfloat16`) and the KV cache of its default DynamicCache, which keeps each layer's
    keys and values in that dtype for every position, unpadded. Not counted: activations, the logits, and the
    framework's own memory (CUDA context, the caching allocator's slack)."""
    context = cfg.max_seq_len if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise FelixError(f"the KV cache context must be a positive number of positions, got {context!r}")
    n_params = sum(math.prod(shape) for shape in gguf_shapes(cfg).values())  # lm_head is tied: not stored
    rows = {}
    for dtype, size in HF_DTYPES.items():
        weights, kv = n_params * size, 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * context * size
        rows[dtype] = {"weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv,
                       "fits_cap": weights + kv <= VRAM_CAP_BYTES}
    return {"runtime": "transformers", "context": context, "batch": 1, "cap_bytes": VRAM_CAP_BYTES,
            "assumes": "weights + the KV cache of transformers' DynamicCache, both in the dtype loaded, batch 1; "
                       "activations, logits and the framework's own memory excluded",
            "models": {"this_model": rows}}
