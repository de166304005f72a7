"""`felix bench`: measured training throughput, MFU and memory on this machine.

`felix bench train` times real optimizer steps (autocast forward, fp32 cross-entropy, backward,
clipping, AdamW) of a config on random tokens, through the trainer's objective (`felix.objective.TrainingObjective`:
with quail.enabled, QUAIL's hinge at a fixed margin, and with quail.ste its fake-quantized forward; the margin's
calibration, every quail.calibrate_every steps, is timed once and reported beside the steps, not in them), and
measures the peak memory of one as the trainer takes it (grad accumulation included), and with `--compare-hf`
times HF transformers' `LlamaForCausalLM` of the same shape, dtype, batch and weights in the same process,
interleaved step by step (A B A B ...) so that background load and clock changes hit both alike.

`felix bench memory` measures the peak memory of real training steps and sets it beside
`felix.memory.train_memory_bytes`' prediction.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from felix.cli import print_json
from felix.commands.arg_types import add_config_overrides, add_json_flag
from felix.config import FelixConfig, load_config
from felix.device import autocast, pick_device, pick_dtype, synchronize
from felix.errors import FelixError

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _Runner:
    """One model + its AdamW, stepping on random token batches exactly as the trainer does."""

    def __init__(self, model: torch.nn.Module, cfg: FelixConfig, device: torch.device, dtype: torch.dtype,
                 hf: bool = False):
        from felix.optim import build_optimizer

        tc = cfg.train
        self.model, self.device, self.dtype, self.hf = model, device, dtype, hf
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, tc)
        # FelixLM steps through the trainer's objective when QUAIL is on (HF Llama has none: plain cross-entropy)
        self.objective = None
        if cfg.quail.enabled and not hf:
            from felix.memory import quail_memory_whitelist
            from felix.objective import TrainingObjective

            self.objective = TrainingObjective(model, cfg.quail, quail_memory_whitelist(cfg.model.vocab_size))
        self.eager = self.objective if self.objective is not None else model
        self.fwd = torch.compile(self.eager) if tc.compile else self.eager
        self.grad_clip = tc.grad_clip
        gen = torch.Generator().manual_seed(tc.seed)
        # A few fixed batches, cycled: random ids cost nothing to make and keep the data path out of the timing.
        self.batches = [torch.randint(0, cfg.model.vocab_size, (tc.micro_batch_size, tc.seq_len + 1),
                                      generator=gen).to(device) for _ in range(4)]
        self.i = 0
        self.accum = tc.grad_accum_steps
        self.times: list[float] = []  # whole micro-batch steps: forward, backward and an optimizer step
        self.optimizer_times: list[float] = []  # the clip and optimizer step within each

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fwd(input_ids=x, use_cache=False) if self.hf else self.fwd(x)
        return out.logits if self.hf else out

    def step(self, timed: bool = True, update: bool = True) -> float:
        """One micro-batch's forward and backward, then (`update`) clipping and the optimizer step; returns the
        loss. Without `update` the gradients stay, for the next micro-batch to accumulate into."""
        from felix.memory import training_loss
        from felix.train_eval import cross_entropy

        tokens = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y = tokens[:, :-1], tokens[:, 1:]
        synchronize(self.device)
        t0 = time.perf_counter()
        if self.hf:  # HF's path: full logits, then the fp32 loss on them
            with autocast(self.device, self.dtype):
                logits = self.logits(x)
            loss = cross_entropy(logits, y)
            del logits
        else:  # FelixLM's training path: the fused fp32 loss (no full logits tensor), QUAIL's hinge when on
            with autocast(self.device, self.dtype):
                loss = training_loss(self.fwd, x, y, self.fwd if self.objective is not None else None)
        loss.backward()
        value = loss.item()  # also waits for the device
        if not update:
            return value
        synchronize(self.device)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        t2 = time.perf_counter()
        if timed:
            self.times.append(t2 - t0)
            self.optimizer_times.append(t2 - t1)
        return value

    def trained_seconds(self) -> list[float]:
        """Each timed step's seconds as the trainer spends them per micro-batch: it steps the optimizer
        once every grad_accum_steps micro-batches, so that share of the step is divided among them."""
        return [t - o + o / self.accum for t, o in zip(self.times, self.optimizer_times, strict=True)]


def _peak_step(runner: _Runner) -> None:
    """One optimizer step as the trainer takes it: with train.grad_accum_steps > 1, a micro-batch's forward and
    backward first, so that the last one runs with the gradients alive (every micro-batch past the first repeats
    that pattern; without it the peak was up to a gradient's size short: 983 vs 1,110 MB, felix-50m at seq 256)."""
    if runner.accum > 1:
        runner.step(timed=False, update=False)
    runner.step(timed=False)


def _cpu_step_peak(runner: _Runner) -> int:
    """Live tensor bytes at the peak of one eager optimizer step (`_peak_step`: weights, gradients, AdamW moments,
    activations), the optimizer's state already made by an earlier step."""
    from felix.memory import StorageTracker

    tracker = StorageTracker()
    state = [t for s in runner.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tracker.track(list(runner.model.parameters()) + list(runner.model.buffers()) + state)
    fwd, runner.fwd = runner.fwd, runner.eager  # eager: a dispatch mode sees every op
    with tracker:
        _peak_step(runner)
    runner.fwd = fwd
    return tracker.peak


def _quail_info(cfg: FelixConfig, runner: _Runner) -> dict:
    """Whether the timed steps carried QUAIL's hinge, how, and (a calibrated margin) one calibration's seconds:
    a cost the trainer pays every quail.calibrate_every steps, outside the steps timed here."""
    from felix.memory import QUAIL_MARGIN, QUAIL_TARGET_SHARE
    from felix.objective import calibrate_margin

    q = cfg.quail
    if not q.enabled:
        return {"enabled": False}
    info = {"enabled": True, "ste": q.ste, "format": q.format, "margin": QUAIL_MARGIN,
            "whitelisted_share": QUAIL_TARGET_SHARE, "calibration_seconds": None,
            "calibrate_every": None if q.margin is not None else q.calibrate_every}
    if q.margin is None:
        # the trainer's calibration: quail.calibration_sequences windows in micro-batches (the runner's, cycled)
        rows = torch.cat(runner.batches)
        rows = rows[torch.arange(q.calibration_sequences, device=rows.device) % len(rows)]
        batches = [(t[:, :-1], t[:, 1:]) for t in rows.split(cfg.train.micro_batch_size)]
        synchronize(runner.device)
        t0 = time.perf_counter()
        calibrate_margin(runner.model, batches, runner.objective.whitelist, q.format, q.percentile, q.calibration)
        synchronize(runner.device)
        info["calibration_seconds"] = time.perf_counter() - t0
    return info


def quail_note(q: dict) -> str:
    """`bench_train`'s "quail" entry in words."""
    if not q["enabled"]:
        return "QUAIL off"
    how = f"quail.ste: a second, {q['format']}-fake-quantized forward" if q["ste"] else "on the full forward"
    text = (f"QUAIL on: its hinge ({how}) in every step, at a fixed margin {q['margin']:g} with 1 in "
            f"{round(1 / q['whitelisted_share'])} targets whitelisted")
    if q["calibration_seconds"] is not None:
        every = f"every {q['calibrate_every']} steps" if q["calibrate_every"] else "once, at the start"
        text += f"; the margin's calibration takes {q['calibration_seconds']:.3g} s {every}, not in tok/s"
    return text


def bench_train(cfg: FelixConfig, steps: int = 10, warmup: int = 2, compare_hf: bool = False) -> dict:
    """Median tok/s, MFU and peak memory of `steps` timed training steps after `warmup` untimed ones."""
    from felix.flops import flops_per_token, mfu, peak_flops
    from felix.model import FelixLM

    if steps < 1 or warmup < 0:
        raise FelixError("--steps must be >= 1 and --warmup >= 0")
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    dtype = pick_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    with device:
        model = FelixLM(cfg.model)
    model.activation_checkpointing = tc.activation_checkpointing
    model.train()
    felix_run = _Runner(model, cfg, device, dtype)

    # Peak memory: measured with only FelixLM alive, before the HF copy exists (on CUDA,
    # max_memory_allocated counts every live tensor, so an HF copy made earlier added 4 bytes/param).
    # The timed steps each take one micro-batch; the peak is of a whole optimizer step, with its accumulation.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(warmup, 1)):
        felix_run.step(timed=False)
    accum = f"{min(tc.grad_accum_steps, 2)} micro-batches (grad accumulation)" if tc.grad_accum_steps > 1 else ""
    if device.type == "cuda":
        _peak_step(felix_run)
        peak_mem = torch.cuda.max_memory_allocated(device)
        mem_source = (f"torch.cuda.max_memory_allocated over the warm-up steps and an optimizer step"
                      f"{f' of {accum}' if accum else ''}")
    else:
        peak_mem = _cpu_step_peak(felix_run)
        mem_source = (f"live tensor bytes at the peak of an eager optimizer step{f' of {accum}' if accum else ''} "
                      f"(felix.memory.StorageTracker)")

    runners = [felix_run]
    hf_model = None
    if compare_hf:
        from felix.hf_convert import to_hf_model

        hf_model = to_hf_model(model)  # same weights, fp32 masters like FelixLM
        if tc.activation_checkpointing:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_run = _Runner(hf_model, cfg, device, dtype, hf=True)
        for _ in range(max(warmup, 1)):
            hf_run.step(timed=False)
        runners.append(hf_run)
    for i in range(steps):
        # A B A B ...; the order flips every round so neither model always runs on a cache the other warmed.
        for r in runners if i % 2 == 0 else runners[::-1]:
            r.step()

    tokens = tc.micro_batch_size * tc.seq_len
    fpt = flops_per_token(cfg.model, tc.seq_len)
    peak, peak_source = (tc.peak_flops, "train.peak_flops") if tc.peak_flops else peak_flops(device, dtype)
    trained = felix_run.trained_seconds()
    tok_per_s = tokens / statistics.median(trained)
    out = {
        "tok_per_s": tok_per_s,
        "tok_per_s_mean": tokens * len(trained) / sum(trained),
        "step_seconds": felix_run.times,
        "optimizer_seconds": felix_run.optimizer_times,
        "grad_accum_steps": tc.grad_accum_steps,
        "mfu": mfu(tok_per_s, fpt, peak),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "peak_memory_bytes": peak_mem,
        "peak_memory_source": mem_source,
        "device": _device_name(device),
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "flops_per_token": fpt,
        "params": model.num_params(),
        "seq_len": tc.seq_len,
        "micro_batch_size": tc.micro_batch_size,
        "steps": steps,
        "warmup": warmup,
        "compile": tc.compile,
        "activation_checkpointing": tc.activation_checkpointing,
        "threads": torch.get_num_threads(),
        "quail": _quail_info(cfg, felix_run),
    }
    if hf_model is not None:
        hf_tok = tokens / statistics.median(runners[1].trained_seconds())
        out |= {"hf_tok_per_s": hf_tok, "hf_step_seconds": runners[1].times, "ratio": tok_per_s / hf_tok,
                "hf_mfu": mfu(hf_tok, fpt, peak)}
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{_cpu_model()} x{torch.get_num_threads()} threads"
    return device.type


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def bench_memory(cfg: FelixConfig) -> dict:
    """Measured peak memory of real training steps on this machine vs the fake-tensor prediction."""
    from felix.memory import measure_step_memory, rss_step_memory, train_memory_bytes

    tc = cfg.train
    device = pick_device(tc.device)
    dtype = pick_dtype(tc.dtype, device)
    name = DTYPE_NAMES[dtype]
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        measure_step_memory(cfg, device, dtype, steps=2)
        measured = torch.cuda.max_memory_allocated(device)
        source = "torch.cuda.max_memory_allocated over 2 steps"
        extra = {}
    else:
        tracked = measure_step_memory(cfg, device, dtype, steps=2)
        rss = rss_step_memory(cfg, name)
        measured = tracked
        source = "live tensor bytes over 2 real steps (StorageTracker)"
        extra = {"rss_peak_growth_bytes": rss,
                 "rss_source": "VmHWM growth of a fresh process running 2 steps (kernel-measured)"}
    seconds = time.perf_counter() - t0
    predicted = train_memory_bytes(cfg, name, device_type=device.type)
    return {
        "measured_bytes": measured,
        "measured_source": source,
        "predicted_bytes": predicted,
        "predicted_over_measured": predicted / measured,
        "device": _device_name(device),
        "dtype": name,
        "seq_len": tc.seq_len,
        "micro_batch_size": tc.micro_batch_size,
        "activation_checkpointing": tc.activation_checkpointing,
        "seconds": seconds,
    } | extra


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("bench", help=help, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", metavar="<what>", required=True)

    t = bsub.add_parser("train", help="tok/s, MFU and peak memory of training steps (optionally vs HF Llama)",
                        description="Time training steps of a config on random data: tokens/s, MFU and peak "
                                    "memory (median of --steps after --warmup), optionally against HF Llama.")
    t.add_argument("--config", required=True, help="YAML config or packaged name")
    t.add_argument("--steps", type=int, default=10, help="timed steps (median reported; default 10)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    t.add_argument("--compare-hf", action="store_true",
                   help="also time HF LlamaForCausalLM (same shape/dtype/batch/weights), interleaved")
    add_json_flag(t)
    add_config_overrides(t)
    t.set_defaults(func=run_train)

    m = bsub.add_parser("memory", help="measured peak training memory vs felix.memory's prediction",
                        description="Run two training steps of a config here and set their measured peak "
                                    "memory beside felix.memory's prediction of the same steps on this device "
                                    "(its dtype and loss chunk), as totals. `felix info` predicts for a GPU, so "
                                    "on a CPU its figure can differ from this one.")
    m.add_argument("--config", required=True, help="YAML config or packaged name")
    add_json_flag(m)
    add_config_overrides(m)
    m.set_defaults(func=run_memory)


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    res = bench_train(cfg, args.steps, args.warmup, args.compare_hf) | {"config": str(args.config)}
    if args.json:
        print_json(res)
        return 0
    mfu_txt = f"{res['mfu']:.1%}" if res["mfu"] is not None else "n/a"
    print(f"{res['device']} {res['dtype']}: {res['tok_per_s']:,.0f} tok/s (median of {res['steps']}), "
          f"MFU {mfu_txt} vs {res['peak_flops_source']}, peak memory {res['peak_memory_bytes'] / 2**20:,.0f} MiB")
    print(quail_note(res["quail"]))
    if "ratio" in res:
        vs = " (FelixLM with QUAIL's hinge, HF without)" if res["quail"]["enabled"] else ""
        print(f"HF LlamaForCausalLM: {res['hf_tok_per_s']:,.0f} tok/s; FelixLM / HF = {res['ratio']:.3f}{vs}")
    return 0


def run_memory(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    res = bench_memory(cfg) | {"config": str(args.config)}
    if args.json:
        print_json(res)
        return 0
    print(f"{res['device']} {res['dtype']}: measured {res['measured_bytes'] / 2**30:.3f} GiB ({res['measured_source']})"
          f", predicted {res['predicted_bytes'] / 2**30:.3f} GiB (x{res['predicted_over_measured']:.3f})")
    if "rss_peak_growth_bytes" in res:
        print(f"RSS peak growth {res['rss_peak_growth_bytes'] / 2**30:.3f} GiB ({res['rss_source']})")
    return 0
