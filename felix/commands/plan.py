"""`felix plan`: the epic's compute envelope from first principles for any config.

Parameters and training memory come from the built model (`felix info`); throughput is given
(`--tok-per-s`), estimated from a GPU's datasheet peak times an assumed MFU (`--gpu NAME --mfu M`),
or measured on this machine with a short `felix bench train`. Days for the configured run (max_steps x
tokens per step) and to 20 and 100 tokens per parameter follow: days = tokens / (tok/s * 86400). So do the
bytes of one checkpoint and the disk the run's checkpoints may take at once (keep_last, the one being
written, the rollback target and the next one, and the keep_every milestones: the count `felix train` warns with).
With --ranks N (torchrun's data-parallel processes), the throughput above is one process's; tokens per step and
the run's tokens are N times one process's, and days assume throughput scales linearly (N x one process's tok/s),
which communication overhead makes optimistic.
"""

from __future__ import annotations

import argparse
import math
import sys

from felix.cli import print_json
from felix.commands.arg_types import add_config_overrides, add_json_flag, int_at_least
from felix.config import load_config
from felix.errors import FelixError

TOKENS_PER_PARAM = (20, 100)  # Chinchilla-optimal; "modestly overtrained" as in the epic


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("plan", help=help,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config or packaged config name")
    p.add_argument("--tok-per-s", type=float, help="training throughput to plan with (tokens/s)")
    p.add_argument("--gpu", help="estimate throughput from this GPU's datasheet bf16 peak (e.g. 'RX 7800 XT')")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation assumed with --gpu (e.g. 0.3)")
    p.add_argument("--bench-steps", type=int, default=3, help="timed steps when measuring here (default 3)")
    p.add_argument("--ranks", type=int_at_least(1), default=1,
                   help="data-parallel processes (torchrun --nproc-per-node x nodes) the run will use; the "
                        "throughput is one process's, scaled by N (assumed linear) (default 1)")
    add_json_flag(p)
    add_config_overrides(p)
    p.set_defaults(func=run)


def check_throughput_args(tok_per_s: float | None, gpu: str | None, mfu: float | None, bench_steps: int) -> None:
    """Refuse conflicting or out-of-range throughput flags, and a GPU the datasheet table lacks, before the (slow,
    for big configs) model count."""
    from felix.flops import GPU_PEAK_FLOPS, datasheet_peak

    if tok_per_s is not None and (gpu is not None or mfu is not None):
        raise FelixError("give --tok-per-s or --gpu/--mfu, not both")
    # `not x > 0` and isfinite: NaN passes `x <= 0`, and NaN or inf would print NaN/Infinity days in the JSON
    if tok_per_s is not None and not (math.isfinite(tok_per_s) and tok_per_s > 0):
        raise FelixError(f"--tok-per-s must be positive and finite, got {tok_per_s}")
    if (gpu is None) != (mfu is None):
        raise FelixError("--gpu and --mfu go together")
    if mfu is not None and not 0 < mfu <= 1:
        raise FelixError(f"--mfu must be in (0, 1], got {mfu}")
    if gpu is not None and datasheet_peak(gpu) is None:
        known = ", ".join(name for _, name, _ in GPU_PEAK_FLOPS)
        raise FelixError(f"--gpu {gpu!r}: not in the datasheet table (felix.flops.GPU_PEAK_FLOPS); known GPUs: "
                         f"{known} (a part of the name is enough, e.g. '7800 xt'); for another GPU give "
                         f"--tok-per-s, measured there with `felix bench train`")
    if tok_per_s is None and gpu is None and bench_steps < 1:
        raise FelixError(f"--bench-steps must be >= 1, got {bench_steps}")


def throughput(cfg, fpt: int, tok_per_s: float | None, gpu: str | None, mfu: float | None,
               bench_steps: int) -> tuple[float, str, dict]:
    """(tok/s, how it was obtained, extra fields) from exactly one of the three sources (flags already
    checked by `check_throughput_args`)."""
    from felix.flops import datasheet_peak

    if tok_per_s is not None:
        return tok_per_s, "given (--tok-per-s)", {}
    if gpu is not None:
        name, peak = datasheet_peak(gpu)  # known: check_throughput_args
        return peak * mfu / fpt, f"datasheet {name} bf16 peak {peak / 1e12:.1f} TFLOP/s x MFU {mfu:g}", {
            "gpu": name, "gpu_peak_flops": peak, "assumed_mfu": mfu}
    from felix.commands.bench import bench_train, quail_note

    # a felix-300m step takes minutes on a CPU: say what the wait is, and how to skip it
    print(f"felix plan: measuring throughput here: {bench_steps + 1} training steps of this config (minutes on a "
          "CPU; --tok-per-s X or --gpu NAME --mfu M skips it)", file=sys.stderr, flush=True)
    r = bench_train(cfg, steps=bench_steps, warmup=1)
    src = (f"measured here: felix bench train, median of {bench_steps} steps, batch {r['micro_batch_size']} "
           f"x seq {r['seq_len']}, {r['dtype']} on {r['device']}, {quail_note(r['quail'])}")
    return r["tok_per_s"], src, {"measured_mfu": r["mfu"], "device": r["device"], "quail": r["quail"]}


def make_plan(cfg, tok_per_s: float | None = None, gpu: str | None = None, mfu: float | None = None,
              bench_steps: int = 3, ranks: int = 1) -> dict:
    """The plan of `cfg` run on `ranks` data-parallel processes, each at the throughput obtained (`tok_per_s`:
    one process's); tokens and days count all ranks, scaling assumed linear."""
    from felix.commands.info import model_info

    if ranks < 1:
        raise FelixError(f"--ranks must be at least 1, got {ranks}")
    check_throughput_args(tok_per_s, gpu, mfu, bench_steps)  # before the model count, which takes a while
    info = model_info(cfg)
    tps, source, extra = throughput(cfg, info["flops_per_token"], tok_per_s, gpu, mfu, bench_steps)
    total_tps = tps * ranks  # linear: each rank steps its own micro-batches; all-reduce overhead left out
    run_tokens = info["run_tokens"] * ranks
    out = {
        "params": info["params"], "splice_params": info["splice_params"],
        "flops_per_token": info["flops_per_token"],
        "train_memory_bytes": info["train_memory_bytes"], "train_memory_assumes": info["train_memory_assumes"],
        "tok_per_s": tps, "throughput_source": source, **extra,
        "ranks": ranks, "total_tok_per_s": total_tps,
        **{k: info[k] for k in ("max_steps", "checkpoint_bytes", "keep_last", "milestones", "run_disk_checkpoints",
                                "run_disk_bytes", "micro_batch_size", "seq_len", "grad_accum_steps")},
        "tokens_per_step": info["tokens_per_step"] * ranks, "run_tokens": run_tokens,
        "run_days": run_tokens / total_tps / 86400,
    }
    for k in TOKENS_PER_PARAM:
        tokens = k * info["params"]
        out[f"tokens_{k}"] = tokens
        out[f"days_{k}"] = tokens / total_tps / 86400
    return out


def run(args: argparse.Namespace) -> int:
    from felix.commands.info import gib, human, run_size_rows

    cfg = load_config(args.config, args.overrides)
    p = make_plan(cfg, args.tok_per_s, args.gpu, args.mfu, args.bench_steps, args.ranks)
    if args.json:
        print_json(p)
        return 0
    size = dict(run_size_rows(p, p["ranks"]))
    size["configured run"] += f" = {p['run_days']:,.1f} days"
    speed = f"{p['tok_per_s']:,.0f} tok/s ({p['throughput_source']})"
    if p["ranks"] > 1:
        speed = (f"{p['total_tok_per_s']:,.0f} tok/s = {p['ranks']} ranks x {speed}; assumes linear scaling "
                 "across ranks, which all-reduce overhead makes optimistic")
    rows = [
        ("parameters", f"{p['params']:,} ({human(p['params'])})"),
        # DDP's all-reduce buckets hold the gradients themselves (`distributed.wrap_ddp`): nothing more per rank
        ("training memory", f"{gib(p['train_memory_bytes'])} per rank ({p['train_memory_assumes']})"
         if p["ranks"] > 1 else f"{gib(p['train_memory_bytes'])} ({p['train_memory_assumes']})"),
        ("throughput", speed),
        *size.items(),
        *((f"{k:>3} tok/param", f"{human(p[f'tokens_{k}'])} tokens = {p[f'days_{k}']:,.1f} days")
          for k in TOKENS_PER_PARAM),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
