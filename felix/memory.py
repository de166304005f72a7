"""Training memory, predicted without allocating it and measured when it is.

`train_memory_bytes(cfg)` runs two real training steps (forward, fp32 cross-entropy, backward,
clip, AdamW) of the configured model under `FakeTensorMode`: every op computes shapes and dtypes
only, so a 1B model at seq 2048 costs nothing. With `quail.enabled` the steps run the trainer's
objective (`felix.objective.TrainingObjective`), so QUAIL's hinge and, with `quail.ste`, its second,
fake-quantized forward without activation checkpointing are measured like the rest. A
`StorageTracker` dispatch mode sees every tensor an op creates and watches its storage with a
weakref finalizer, so it knows the bytes alive after each op; the maximum is the step's peak. This
is a measurement of what the program keeps alive (autograd's saved tensors, activation
checkpointing, the autocast weight cache, optimizer moments, foreach temporaries), not a formula.
It does not see memory private to a kernel (cuBLAS/oneDNN workspaces), allocator fragmentation or
the CUDA context (~0.3-0.5 GB), so budget a margin on GPU.

The same tracker on real tensors measures a real step (`felix bench memory`, `measure_step_memory`).

QUAIL needs two things fake tensors lack. A whitelist: there is no tokenizer, so the lowest
`QUAIL_TARGET_SHARE` of the vocabulary's ids are whitelisted and the uniformly random targets hit
them at that rate. And values: `h[mask]` has as many rows as the mask has true positions, which a
fake mask does not know. `KnownValues` computes the small integer and boolean tensors (tokens,
masks, counts) on real tensors alongside the fake program, so those sizes are the real ones.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from felix import checkpoint as ckpt_io
from felix.config import FelixConfig, config_from_dict
from felix.device import autocast
from felix.fake_values import KnownValues
from felix.model import FelixLM, loss_chunk_rows
from felix.objective import TrainingObjective
from felix.optim import build_optimizer
from felix.quail import Whitelist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The share of target positions the prediction whitelists for QUAIL. The hinge's own memory (the head's
# logits at those positions and their fp32 copies) grows with it. 1/32 is 20x EXP-40b's refusal tokens
# (3.2 per 2,048) and one <|endoftext|> per 32-token document: meant to stay above real whitelists.
QUAIL_TARGET_SHARE = 1 / 32
QUAIL_MARGIN = 1.0  # the hinge's margin: its value changes no tensor's size


class StorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages created under this mode (or registered with `track`).

    Storages are keyed by identity and released by a weakref finalizer, so `current` follows the
    program's real lifetimes (including tensors autograd saves for backward) and `peak` is exact at
    op granularity. Works on real and fake tensors alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> bytes counted for it

    def track(self, tensors) -> None:
        """Count the storages of already existing tensors (e.g. parameters built before the mode)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        if t.layout != torch.strided or t.device.type == "meta" and not _is_fake(t):
            return
        st = t.untyped_storage()
        key, nbytes = id(st), st.nbytes()
        old = self._live.get(key)
        if old is None:
            self._live[key] = nbytes
            self.current += nbytes
            weakref.finalize(st, self._free, key)
        elif nbytes > old:  # resized in place (out= ops)
            self._live[key] = nbytes
            self.current += nbytes - old

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32 from full logits (the unfused path, for models without `targets=`)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def quail_memory_whitelist(vocab_size: int, share: float = QUAIL_TARGET_SHARE) -> Whitelist:
    """A whitelist of the lowest `share` of the vocabulary's ids (at least one): uniformly random targets
    hit it at that rate. The memory prediction's stand-in for `quail.tokens`, which need a tokenizer."""
    n = max(1, round(vocab_size * share))
    return Whitelist(tuple(range(n)), (f"token ids 0-{n - 1}",))


def training_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  objective: TrainingObjective | None = None) -> torch.Tensor:
    """The loss the trainer differentiates: `objective`'s total (cross-entropy plus QUAIL's hinge) when
    given, else the model's fused fp32 cross-entropy (`FelixLM(x, targets=y)`)."""
    if objective is None:
        return model(x, targets=y)
    return objective(x, y, QUAIL_MARGIN)[0]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, dtype: torch.dtype, grad_clip: float,
               params: list[torch.nn.Parameter] | None = None,
               objective: TrainingObjective | None = None) -> torch.Tensor:
    """One optimizer step of the real recipe: autocast forward with the fused fp32 loss (`training_loss`:
    QUAIL's objective when given), backward, clip, AdamW. `model` may be a compiled wrapper; `params`
    are the parameters to clip (default: the model's). Returns the detached loss."""
    with autocast(device, dtype):
        loss = training_loss(model, x, y, objective)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params if params is not None else model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _run_steps(cfg: FelixConfig, device: torch.device, dtype: torch.dtype, steps: int,
               tracker: StorageTracker | None, target: torch.device | None = None) -> None:
    """Build model + optimizer under `tracker` and run `steps` training steps on random tokens, through the
    trainer's `TrainingObjective` when quail.enabled (whitelist: `quail_memory_whitelist`).

    `target` is the device type the steps stand for (default: `device`): it sizes the loss's logits chunk."""
    tc = cfg.train
    with tracker if tracker is not None else contextlib.nullcontext():
        with device:  # built in place: no host copy, and fake tensors need no .to()
            model = FelixLM(cfg.model)
        model.activation_checkpointing = tc.activation_checkpointing
        # the loss's logits chunk where the trainer runs (fake tensors live on the CPU; a GPU's is 16x larger)
        model.loss_chunk_rows = loss_chunk_rows(cfg.model.vocab_size, (target or device).type)
        model.train()
        objective = (TrainingObjective(model, cfg.quail, quail_memory_whitelist(cfg.model.vocab_size))
                     if cfg.quail.enabled else None)
        params = [p for p in model.parameters()]
        # The optimizer the trainer builds (felix.optim: fused AdamW on every device type).
        optimizer = build_optimizer(model, tc)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            tokens = torch.randint(0, cfg.model.vocab_size, (tc.micro_batch_size, tc.seq_len + 1), generator=gen)
            tokens = tokens.to(device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            # With accumulation, micro-batch 2 onwards runs with the gradients alive; every later one
            # repeats micro-batch 2's memory pattern, so two are enough to see the peak.
            for _ in range(min(tc.grad_accum_steps, 2) - 1):
                with autocast(device, dtype):
                    loss = training_loss(model, x, y, objective)
                loss.backward()
            train_step(model, optimizer, x, y, device, dtype, tc.grad_clip, params, objective)
        del model, objective, optimizer, params
    gc.collect()


def train_memory_bytes(cfg: FelixConfig, dtype: str = "bf16", device_type: str = "cuda") -> int:
    """Predicted peak bytes of training `cfg` at train.seq_len x train.micro_batch_size.

    `dtype`: the autocast dtype ("bf16" default: fp32 master weights, gradients and AdamW moments
    with bf16 activations, the GPU recipe; "fp32": no autocast). `device_type` is the device trained on,
    which sizes the fused loss's logits chunk (`felix.model.loss_chunk_rows`). The count
    honours train.activation_checkpointing and train.grad_accum_steps and is the maximum over two
    steps, so it includes the optimizer moments alive during step two.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tracker = StorageTracker()
    # Fake tensors live on the CPU; autocast there follows the same fp32-weights/bf16-compute split.
    # Real inputs are allowed: the quantization formats' codebooks are real constants (a few floats).
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Only QUAIL's whitelist mask makes sizes data-dependent; the plain step runs without the overhead.
    tokens = cfg.train.micro_batch_size * (cfg.train.seq_len + 1)
    known = (KnownValues(fake_mode, max(tokens, cfg.model.vocab_size)) if cfg.quail.enabled
             else contextlib.nullcontext())
    with fake_mode, known:
        _run_steps(cfg, torch.device("cpu"), DTYPES[dtype], 2, tracker, target=torch.device(device_type))
    return tracker.peak


def measure_step_memory(cfg: FelixConfig, device: torch.device, dtype: torch.dtype, steps: int = 2) -> int:
    """Peak bytes of live tensors over `steps` real training steps on `device` (tracker-measured)."""
    tracker = StorageTracker()
    _run_steps(cfg, device, dtype, steps, tracker)
    return tracker.peak


def checkpoint_bytes(cfg: FelixConfig) -> int:
    """The bytes one training checkpoint of `cfg` may take on disk, the trainer's own figure
    (`felix.checkpoint.checkpoint_bytes`): the model's state dict as trained (fp32) and the optimizer's state for
    each parameter it steps, exactly, plus a bound on file headers, the RNG state and trainer.json, plus the
    tokenizer copy when data.tokenizer names a file (a config without its data yet: without it, a few MB at most).
    Counted on a meta-device model."""
    with torch.device("meta"):
        model = FelixLM(cfg.model)
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file() else None
    return ckpt_io.checkpoint_bytes(model, build_optimizer(model, cfg.train), tokenizer)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_child() -> None:
    """Child side of `rss_step_memory`: config JSON on stdin, peak RSS growth in bytes on stdout."""
    import json
    import sys

    req = json.load(sys.stdin)
    cfg = config_from_dict(req["config"])
    dtype = DTYPES[req["dtype"]]
    cpu = torch.device("cpu")
    # Warm up on a tiny copy first: oneDNN kernels, autograd and thread pools allocate once per process.
    tiny = config_from_dict({"model": cfg.model.model_dump() | {"n_layers": 1, "max_seq_len": 8},
                             "train": cfg.train.model_dump() | {"seq_len": 8, "micro_batch_size": 1},
                             "quail": cfg.quail.model_dump()})
    _run_steps(tiny, cpu, dtype, 1, StorageTracker())
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    _run_steps(cfg, cpu, dtype, 2, None)  # untracked: no dispatch overhead, nothing held
    print((_rss_kib("VmHWM") - base) * 1024)


def rss_step_memory(cfg: FelixConfig, dtype: str = "fp32", timeout: float = 1800) -> int:
    """Peak resident-memory growth of real training steps on the CPU, measured in a fresh process.

    Independent of `StorageTracker`: the kernel's peak RSS (VmHWM, reset after warm-up) minus the
    RSS before the model is built. glibc is told to mmap every block over 128 KiB, so a freed tensor
    leaves RSS at once and the peak is not inflated by heap reuse. Linux only.
    """
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    req = json.dumps({"config": cfg.model_dump(mode="json"), "dtype": dtype})
    proc = subprocess.run([sys.executable, "-c", "from felix.memory import _rss_child; _rss_child()"],
                          input=req, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS measurement failed: {proc.stderr.strip()[-2000:]}")
    return int(proc.stdout.strip().splitlines()[-1])
