"""Device and precision selection: cuda (which also means ROCm), mps, or cpu."""

from __future__ import annotations

import contextlib

import torch

from felix.errors import FelixError


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return check_device(requested)


def check_device(device: str | torch.device) -> torch.device:
    """`device` parsed and present: a typo or a missing GPU is one clear line, not a torch traceback from
    deep inside a weight load or the first step."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FelixError(f"device {str(device)!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FelixError(f"device {str(device)!r}: no CUDA/ROCm device is visible")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FelixError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise FelixError(f"device {str(device)!r}: MPS is not available on this machine")
    return dev


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype; `auto` is bf16 where the device runs it natively, else fp32."""
    if requested == "fp32":
        return torch.float32
    if requested == "fp16":
        return torch.float16
    if requested == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_fast_bf16(device) else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """True where the GPU has bf16 tensor cores: NVIDIA from Ampere (sm_80) on; every ROCm device, as torch
    holds. Not `torch.cuda.is_bf16_supported()`, which by default also says True where bf16 is only emulated
    (a T4 or V100), several times slower than fp32 there."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16/AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision around forward passes; a no-op for fp32 (weights stay fp32 either way)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
