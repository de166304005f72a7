#!/usr/bin/env python
"""The CUDA path of FelixLM, checked on a GPU: flash attention, bf16, torch.compile and the KV cache.

Each check builds a FelixLM with felix-300m's head shape (head dim 64, SwiGLU, SpliceCore every 4th
layer) but few layers, so the whole script takes seconds, and reports figures, not just pass/fail:

- `flash_attention`: the training loss and gradients with SDPA restricted to the flash kernel (bf16
  autocast) against the math kernel; fails if flash cannot run FelixLM's attention at all.
- `fp32_parity`: fp32 logits on the GPU (TF32 off) against the CPU's, same weights.
- `compile_parity`: loss and gradient norm of `torch.compile(model)` against eager, bf16 autocast.
- `kv_cache`: logits of a prefill plus one-token steps through the KV cache against one full
  forward (fp32).
- `checkpoint_rng`: a training checkpoint restores this device's CUDA generator exactly.
- `host_syncs`: the trainer's per-micro-batch work (`felix.train_step.accumulate_gradients`: batches copied from
  the host, bf16 forward with the fused loss and activation checkpointing, backward) never waits on the GPU:
  run under `torch.cuda.set_sync_debug_mode("error")`, where any synchronizing call raises. (QUAIL's masked hinge
  syncs by nature, `h[mask]` sizes its output from the mask, and is not run here.)

    python scripts/cuda_checks.py --json          (scripts/gpu_checks.sh runs it on the device)

On a machine without CUDA it runs the checks that need none on the CPU (`--device cpu --seq 128`), which
is how the script itself is tried out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from felix.config import ModelConfig
from felix.device import autocast, pick_dtype
from felix.model import FelixLM, KVCache


def small_model(device: torch.device, n_layers: int = 4, seq: int = 2048) -> FelixLM:
    """felix-300m's widths and head shape, fewer layers (SpliceCore on layer 3), seeded."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32768, n_layers=n_layers, d_model=1024, n_heads=16, d_ff=4096, max_seq_len=seq)
    model = FelixLM(cfg).to(device)
    with torch.no_grad():  # SpliceCore starts at zero; give it a value so its path is exercised too
        for core in model.splice_cores().values():
            core.b.normal_(std=0.02)
    return model


def tokens(batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 32768, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    return ids[:, :-1], ids[:, 1:]


def loss_and_grads(model: FelixLM, x, y, device, forward: Callable | None = None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with autocast(device, torch.bfloat16):
        loss = (model if forward is None else forward)(x, targets=y)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_flash_attention(device: torch.device, seq: int) -> dict[str, Any]:
    model = small_model(device, seq=seq)
    x, y = tokens(2, seq, device)
    with sdpa_kernel([SDPBackend.MATH]):
        loss_math, g_math = loss_and_grads(model, x, y, device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss_flash, g_flash = loss_and_grads(model, x, y, device)
    return {"loss_math": loss_math, "loss_flash": loss_flash, "loss_abs_diff": abs(loss_flash - loss_math),
            "grad_rel_diff": rel(g_flash, g_math), "ok": abs(loss_flash - loss_math) < 1e-2}


def check_fp32_parity(device: torch.device, seq: int) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = small_model(torch.device("cpu"), seq=256).eval()
    x, _ = tokens(2, 256, torch.device("cpu"))
    with torch.no_grad():
        ref = model(x)
        out = model.to(device)(x.to(device)).cpu()
    diff = (out - ref).abs().max().item()
    return {"max_abs_diff": diff, "logit_scale": ref.abs().max().item(), "ok": diff < 1e-3}


def check_compile_parity(device: torch.device, seq: int) -> dict[str, Any]:
    model = small_model(device, seq=seq)
    x, y = tokens(2, seq, device)
    loss_eager, g_eager = loss_and_grads(model, x, y, device)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    loss_compiled, g_compiled = loss_and_grads(model, x, y, device, forward=compiled)
    first_step_s = time.perf_counter() - t0
    return {"loss_eager": loss_eager, "loss_compiled": loss_compiled,
            "loss_abs_diff": abs(loss_compiled - loss_eager), "grad_rel_diff": rel(g_compiled, g_eager),
            "first_compiled_step_s": round(first_step_s, 1), "ok": abs(loss_compiled - loss_eager) < 1e-2}


def check_kv_cache(device: torch.device, seq: int) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_model(device, seq=512).eval()
    ids = tokens(1, 56, device)[0]
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, 1, 56, device)
        cached = torch.cat([model(ids[:, :32], cache=cache),  # prefill, then one token at a time
                            *(model(ids[:, i:i + 1], cache=cache) for i in range(32, 56))], dim=1)
    diff = (cached - full).abs().max().item()
    return {"positions": 56, "decoded_one_at_a_time": 24, "max_abs_diff": diff, "ok": diff < 1e-3}


def check_checkpoint_rng(device: torch.device, seq: int) -> dict[str, Any]:
    """A checkpoint restores this device's CUDA generator, and writing one opens no context elsewhere."""
    import tempfile
    from pathlib import Path

    from felix.checkpoint import restore_training_state, save_checkpoint
    from felix.config import FelixConfig, TrainConfig

    model = FelixLM(ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, d_ff=128,
                                max_seq_len=64)).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.cuda.manual_seed(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp), 1, model, FelixConfig(model=model.cfg, train=TrainConfig(seq_len=64)),
                               {}, optimizer)
        expected = torch.rand(4, device=device)
        torch.rand(100, device=device)  # move the generator on
        restore_training_state(path, model, optimizer)
        again = torch.rand(4, device=device)
    others = [i for i in range(torch.cuda.device_count()) if i != torch.cuda.current_device()
              and torch.cuda.memory_reserved(i) > 0]
    return {"restored": bool(torch.equal(expected, again)), "devices": torch.cuda.device_count(),
            "other_devices_touched": others, "ok": bool(torch.equal(expected, again)) and not others}


def check_host_syncs(device: torch.device, seq: int) -> dict[str, Any]:
    from felix.distributed import DistInfo
    from felix.objective import TrainingObjective
    from felix.train_step import accumulate_gradients

    model = small_model(device, seq=seq)
    model.activation_checkpointing = True
    batches = [tokens(2, seq, torch.device("cpu")) for _ in range(2)]  # on the host, as the loader gives them
    args = (TrainingObjective(model), batches, 0.0, None, None, DistInfo(), device, torch.bfloat16)
    accumulate_gradients(*args)  # warm-up: kernel selection, workspaces, the gradients' first allocation
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        accumulate_gradients(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"micro_batches": len(batches), "ok": True}  # a sync would have raised


CHECKS = {"flash_attention": check_flash_attention, "fp32_parity": check_fp32_parity,
          "compile_parity": check_compile_parity, "kv_cache": check_kv_cache,
          "checkpoint_rng": check_checkpoint_rng, "host_syncs": check_host_syncs}
NEEDS_CUDA = {"flash_attention", "fp32_parity", "checkpoint_rng", "host_syncs"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, which skips the GPU-only checks")
    ap.add_argument("--seq", type=int, default=2048, help="training sequence length of the checks (default 2048)")
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    # ROCm builds: torch.version.hip, and torch.version.cuda is None
    report: dict[str, Any] = {"torch": torch.__version__, "hip": torch.version.hip, "cuda": torch.version.cuda,
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              # train.dtype auto's choice: bf16 only with bf16 tensor cores (felix.device)
                              "auto_dtype": str(pick_dtype("auto", device)).removeprefix("torch.")}
    for name in args.only or CHECKS:
        if name in NEEDS_CUDA and device.type != "cuda":
            report[name] = {"skipped": "needs CUDA"}
            continue
        t0 = time.perf_counter()
        try:
            report[name] = CHECKS[name](device, args.seq)
        except Exception as exc:  # a failed check is a result: report it and run the others
            traceback.print_exc()
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if name == "flash_attention" and torch.version.hip:
                report[name]["hint"] = ("PyTorch's ROCm flash kernels have been experimental on RDNA3: try again with "
                                        "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1; without them training runs on "
                                        "SDPA's math kernel (README, 'ROCm and the RX 7800 XT')")
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {report[name]}", file=sys.stderr, flush=True)
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    report["failed"] = failed
    if args.json:
        print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
