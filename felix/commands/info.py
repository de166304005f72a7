"""`felix info`: parameters, FLOPs per token, training memory and the run's size (tokens, checkpoint disk) of a
config, from the built model."""

from __future__ import annotations

import argparse

from felix.cli import print_json
from felix.commands.arg_types import add_config_overrides, add_json_flag
from felix.config import FelixConfig, load_config


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("info", help=help,
                       description="Count parameters and training FLOPs per token, predict the peak "
                                   "training memory of a config, and size its run: tokens per step and in "
                                   "all (max_steps), bytes per checkpoint and on disk at most (keep_last, "
                                   "the one being written, the rollback target and the next one, and the "
                                   "milestones), all from the built model (on the meta device / fake tensors: "
                                   "nothing is allocated).")
    p.add_argument("--config", required=True, help="YAML config or packaged config name")
    add_json_flag(p)
    add_config_overrides(p)
    p.set_defaults(func=run)


def memory_dtype(cfg: FelixConfig) -> str:
    """The autocast dtype the memory prediction assumes: the config's, and bf16 (the GPU recipe) for auto."""
    return "bf16" if cfg.train.dtype == "auto" else cfg.train.dtype


def precision_assumption(dtype: str) -> str:
    """The memory prediction's precision in words: fp32 runs without autocast (`felix.device.autocast`)."""
    return "fp32, no autocast" if dtype == "fp32" else f"{dtype} autocast"


def quail_assumption(cfg: FelixConfig) -> str:
    """What the memory prediction assumes about QUAIL (nothing when it is off): the whitelist's share of
    target positions, which sizes the hinge's logits, and the straight-through pass it runs."""
    from felix.memory import QUAIL_TARGET_SHARE

    q = cfg.quail
    if not q.enabled:
        return ""
    text = (f"; QUAIL's objective with 1 in {round(1 / QUAIL_TARGET_SHARE)} target positions whitelisted (assumed: "
            "20x EXP-40b's refusal tokens; the hinge's logits grow with the share)")
    if q.ste:
        text += f", including quail.ste's second forward on {q.format} fake-quantized weights without checkpointing"
    return text


def run_size(cfg: FelixConfig) -> dict:
    """Tokens per optimizer step and in the configured run (one process: torchrun multiplies both by its ranks),
    bytes of one checkpoint (the trainer's figure, `felix.memory.checkpoint_bytes`) and the disk the run's
    checkpoints may take at once (`felix.train_ckpt.disk_needed`, the count the trainer warns with)."""
    from felix.memory import checkpoint_bytes
    from felix.train_ckpt import disk_needed

    t = cfg.train
    per_step = t.micro_batch_size * t.seq_len * t.grad_accum_steps
    ckpt = checkpoint_bytes(cfg)
    disk = disk_needed(t, ckpt)
    return {"tokens_per_step": per_step, "max_steps": t.max_steps, "run_tokens": per_step * t.max_steps,
            "checkpoint_bytes": ckpt, "keep_last": t.keep_last, "milestones": disk.milestones,
            "run_disk_checkpoints": disk.checkpoints, "run_disk_bytes": disk.bytes}


def model_info(cfg: FelixConfig) -> dict:
    """Shape, parameter counts, FLOPs per token and predicted training memory of `cfg`."""
    import torch

    from felix.flops import flops_per_token
    from felix.memory import train_memory_bytes
    from felix.model import FelixLM

    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        model = FelixLM(m)
    params = model.num_params()
    emb = model.tok_emb.weight.numel()
    dtype = memory_dtype(cfg)
    return {
        "params": params,
        "splice_params": model.num_splice_params(),
        "embedding_params": emb,
        "non_embedding_params": params - emb,
        "flops_per_token": flops_per_token(m, t.seq_len),
        "train_memory_bytes": train_memory_bytes(cfg, dtype, "cuda"),
        "train_memory_assumes": f"{precision_assumption(dtype)}, fp32 weights/grads/AdamW moments (fused), "
                                f"batch {t.micro_batch_size} x seq {t.seq_len}, grad accumulation "
                                f"{t.grad_accum_steps}, activation checkpointing "
                                f"{'on' if t.activation_checkpointing else 'off'}" + quail_assumption(cfg)
                                # sized for a GPU (the loss's logits chunk); what felix.memory cannot see
                                + "; a GPU's live tensors, not its runtime context or kernel workspaces",
        "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads, "n_kv_heads": m.kv_heads,
        "head_dim": m.head_dim, "d_ff": m.d_ff, "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len,
        "splice_layers": m.splice_layers, "splice_rank": m.splice_rank,
        "seq_len": t.seq_len, "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "activation_checkpointing": t.activation_checkpointing,
        **run_size(cfg),
    }


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (powers of 1000; bytes use GiB via `gib`)."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_size_rows(info: dict, ranks: int | None = None) -> list[tuple[str, str]]:
    """The text rows of `run_size`'s figures, for `felix info` and `felix plan` (`ranks`: the processes its
    tokens per step already count, `felix plan --ranks`; None: one process's, as `felix info` gives them)."""
    shape = f"batch {info['micro_batch_size']} x seq {info['seq_len']} x grad accumulation {info['grad_accum_steps']}"
    if ranks is None:
        shape += "; torchrun: x ranks"
    elif ranks == 1:
        shape += "; one process: plan torchrun's with --ranks N"
    else:
        shape += f" x {ranks} ranks"
    return [
        ("tokens per step", f"{info['tokens_per_step']:,} ({shape})"),
        ("configured run", f"{info['max_steps']:,} steps = {human(info['run_tokens'])} tokens"),
        ("checkpoint", f"{gib(info['checkpoint_bytes'])} ({human(info['checkpoint_bytes'], 'B')}: fp32 weights "
                       f"+ AdamW's two moments + headers and tokenizer)"),
        ("checkpoint disk", f"{gib(info['run_disk_bytes'])} at most ({info['run_disk_checkpoints']} checkpoints: "
                            f"keep_last {info['keep_last']} + 1 being written + the rollback target and the next one"
                            + (f" + {info['milestones']} milestones (keep_every)" if info["milestones"] else "") + ")"),
    ]


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg)
    if args.json:
        print_json(info)
        return 0
    rows = [
        ("parameters", f"{info['params']:,} ({human(info['params'])})"),
        ("  embedding (tied)", f"{info['embedding_params']:,}"),
        ("  SpliceCore", f"{info['splice_params']:,} in layers {info['splice_layers']}, rank {info['splice_rank']}"),
        ("shape", f"{info['n_layers']} layers x {info['d_model']}, {info['n_heads']} heads "
                  f"({info['n_kv_heads']} kv) x {info['head_dim']}, FFN {info['d_ff']}, vocab {info['vocab_size']}"),
        ("training FLOPs/token", f"{human(info['flops_per_token'], 'FLOP')} at seq {info['seq_len']}"),
        ("training memory", f"{gib(info['train_memory_bytes'])} ({info['train_memory_assumes']})"),
        *run_size_rows(info),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
