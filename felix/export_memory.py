"""Deployment memory of a GGUF export, from the model config alone: weights + fp16 KV cache.

The weight bytes follow the export's own per-tensor type rule (`felix.export_gguf.tensor_type`),
so the estimate and the file agree (up to GGUF's 32-byte tensor alignment and the metadata). What
is left out: llama.cpp's compute buffers and scratch, which depend on batch size and backend.
"""

from __future__ import annotations

from felix.config import ModelConfig, load_config
from felix.export_gguf import BYTES_PER_WEIGHT, DTYPES, adapter_shapes, gguf_shapes, tensor_type
from felix.quantize import KV_CONTEXT, VRAM_CAP_BYTES, kv_cache_bytes


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


def deployment_memory(cfg: ModelConfig, context: int = KV_CONTEXT) -> dict[str, dict]:
    """Per dtype: weights, KV cache, adapter, their total, and whether it fits the 4 GiB cap."""
    kv, adapter = kv_cache_bytes(cfg, context), adapter_bytes(cfg)
    out = {}
    for dtype in DTYPES:
        weights = weight_bytes(cfg, dtype)
        total = weights + kv + adapter
        out[dtype] = {"weights_bytes": weights, "kv_cache_bytes": kv, "adapter_bytes": adapter,
                      "total_bytes": total, "fits_cap": total <= VRAM_CAP_BYTES}
    return out


def memory_report(own: ModelConfig | None = None, configs: tuple[str, ...] = ("felix-300m", "felix-500m"),
                  context: int = KV_CONTEXT) -> dict:
    """Deployment memory at `context` positions of the packaged configs (and of the exported model, as
    `this_model`)."""
    report = {name: deployment_memory(load_config(name).model, context) for name in configs}
    if own is not None:
        report["this_model"] = deployment_memory(own, context)
    return {"context": context, "kv_cache_dtype": "f16", "cap_bytes": VRAM_CAP_BYTES,
            "assumes": "weights + f16 KV cache at the context + f32 SpliceCore adapter; compute buffers excluded",
            "models": report}
