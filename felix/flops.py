"""FLOPs per token, device peak FLOP/s and MFU.

`flops_per_token` counts what the model actually executes: it runs one forward + backward of the
configured model on the meta device (shapes only, no weights, no memory) under PyTorch's
`FlopCounterMode`, at batch 1 x seq_len, and divides by seq_len. Matmuls (including the tied LM
head and the attention score/value products, which the meta device runs through SDPA's math path)
are counted; elementwise work is not, matching the usual MFU convention (6N + 12·L·d·T, as in PaLM
and nanochat). N is every matmul weight: the parameters less the norm gains, the tied embedding counted
once, as the LM head (its lookup is free), so not `felix info`'s non_embedding_params (Kaplan's N);
d = n_heads x head_dim, T = seq_len, the whole causal square (PaLM's convention; flash kernels skip half).
Activation-checkpointing recompute is not counted either: MFU measures useful work.

The peak is measured on CPU/MPS (there is no datasheet for "this VM's 2 cores") and taken from the
vendor's dense bf16 figure on GPUs.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from felix.config import ModelConfig
from felix.model import FelixLM

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from vendor datasheets, in FLOP/s, matched by
# substring of torch.cuda.get_device_name() (lower-cased), most specific first.
GPU_PEAK_FLOPS: list[tuple[str, str, float]] = [
    # (substring, name, flop/s)
    ("h100 nvl", "NVIDIA H100 NVL", 835e12),
    ("h100 pcie", "NVIDIA H100 PCIe", 756e12),
    ("h100", "NVIDIA H100 SXM", 989.4e12),
    # "gh200" and "h200 nvl" before "h200", which is a substring of both; the NVL card runs at lower clocks
    # (1,671 TFLOP/s with sparsity on NVIDIA's H200 datasheet, vs 1,979 for the SXM module).
    ("gh200", "NVIDIA GH200", 989.4e12),
    ("h200 nvl", "NVIDIA H200 NVL", 835.5e12),
    ("h200", "NVIDIA H200", 989.4e12),
    ("b200", "NVIDIA B200", 2250e12),
    ("a100", "NVIDIA A100", 312e12),
    ("a10g", "NVIDIA A10G", 70e12),
    ("l40s", "NVIDIA L40S", 362.05e12),
    ("l40", "NVIDIA L40", 181.05e12),
    ("l4", "NVIDIA L4", 121e12),
    ("rtx 4090", "NVIDIA GeForce RTX 4090", 165.2e12),  # Ada whitepaper, bf16 w/ fp32 accumulate
    ("rtx 3090", "NVIDIA GeForce RTX 3090", 71e12),  # Ampere GA102 whitepaper, bf16 w/ fp32 accumulate
    ("mi300x", "AMD Instinct MI300X", 1307.4e12),
    ("mi325x", "AMD Instinct MI325X", 1307.4e12),
    ("mi250x", "AMD Instinct MI250X", 383e12),
    ("mi250", "AMD Instinct MI250", 362.1e12),
    # RDNA3 (Navi 32): 3840 shaders x 2 (dual issue) x 2 (FMA) x 2.43 GHz boost = 37.3 TFLOP/s fp32
    # (cputronic.com/gpu/amd-radeon-rx-7800-xt: "37.32 TFLOPS"; tomshardware.com/reviews/amd-radeon-
    # rx-7800-xt-review: 3840 shaders, 2430 MHz); WMMA runs fp16/bf16 at twice that, 74.65 TFLOP/s,
    # the "Peak Half Precision" on AMD's product page. Sustained WMMA matmul is well below this.
    ("7800 xt", "AMD Radeon RX 7800 XT", 74.65e12),
    ("7900 xtx", "AMD Radeon RX 7900 XTX", 122.8e12),
]


def _model_config(model_or_cfg: FelixLM | ModelConfig) -> ModelConfig:
    return model_or_cfg.cfg if isinstance(model_or_cfg, FelixLM) else model_or_cfg


def flops_per_token(model_or_cfg: FelixLM | ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) at `seq_len`, counted on a meta-device copy."""
    cfg = _model_config(model_or_cfg)
    if not 0 < seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len must be in [1, {cfg.max_seq_len}], got {seq_len}")
    return _count(cfg.model_dump_json(), seq_len)


@functools.lru_cache(maxsize=64)
def _count(cfg_json: str, seq_len: int) -> int:
    cfg = ModelConfig.model_validate_json(cfg_json)
    with torch.device("meta"):
        model = FelixLM(cfg)
    idx = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        logits = model(idx)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx.reshape(-1))
        loss.backward()
    return int(counter.get_total_flops()) // seq_len


@functools.cache
def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`: the fastest of `repeats` timed runs.

    The fastest, not the median: a peak is what the device can do, and on a shared machine the slower
    runs measure the neighbours (a median taken while another job ran made MFU read above 100%).
    The side doubles from 256 up to `size` while the next side's product would take under a second: a
    dtype the CPU only emulates (fp16, bf16 without AVX512-BF16) took minutes at 2048, and is slow at
    any size, while native kernels reach 2048 as before.

    Cached per (device, dtype, size, repeats) for the process, so the trainer, bench and plan pay it once.
    """
    device = torch.device(device)
    side = min(256, size)
    while True:
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        a @ b  # warm-up: kernel selection, caches, clocks (the first product can take 100x longer)
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if side >= size or 8 * (time.perf_counter() - t0) > 1.0:  # the next side's product: 8x the work
            break
        side = min(2 * side, size)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * side**3 / min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    """(name, dense bf16 FLOP/s) for a GPU name as torch reports it, or None if not in the table."""
    low = device_name.lower()
    for key, name, flops in GPU_PEAK_FLOPS:
        if key in low:
            return name, flops
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The MFU denominator and where it came from.

    CPU/MPS: the measured matmul peak of the device, the faster of fp32 and `dtype`: a dtype the device only
    emulates (fp16 on most CPUs: a few GFLOP/s against fp32's hundreds) is no peak, and against it a run
    read 448% MFU. CUDA/ROCm: the datasheet dense bf16 peak (used for every dtype: MFU is conventionally
    against the bf16 tensor-core peak), or None if unknown. Either way, the device's best, not the dtype's.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = datasheet_peak(name)
        if found is None:
            return None, f"unknown GPU {name!r} (no datasheet peak)"
        return found[1], f"datasheet {found[0]}"
    peaks = {d: measure_matmul_peak(device, d) for d in dict.fromkeys((torch.float32, dtype))}
    best = max(peaks, key=peaks.get)
    faster = f", faster than {_dtype_name(dtype)}" if best != dtype else ""
    return peaks[best], f"measured matmul peak ({device.type}, {_dtype_name(best)}{faster})"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def mfu(tok_per_s: float, flops_per_token: int | float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved useful FLOP/s over the device peak (None without a peak)."""
    if not peak:
        return None
    return tok_per_s * flops_per_token / peak
