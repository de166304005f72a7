"""`felix train`: pretrain (or continue) a FelixLM from a config."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_config_overrides, add_json_flag
from felix.config import FelixConfig, load_config
from felix.train_state import TrainResult

HELP = """Train a FelixLM on a data mix with the WSD schedule.

Overrides are `section.key=value` pairs applied on top of the config, e.g.
  felix train --config configs/felix-50m.yaml --out runs/pilot train.lr=1e-3 train.max_steps=500
Multi-GPU / multi-process: launch under torchrun, e.g.
  torchrun --nproc_per_node=2 -m felix train --config ... --out ...
To branch a decay off a stable-phase checkpoint (same seq_len, seed and mix sources; weights changed in
the mix apply from the branch point, and each source continues its shuffle; train.keep_every keeps such
milestones past keep_last):
  felix train --config C --out runs/decay --init-from runs/main/checkpoints/step-00050000 \\
      train.decay_start_step=50000 train.max_steps=60000
On a mix of other sources or a new seq_len, start from the weights alone (step 0, fresh optimizer and data stream):
  felix train --config C --out runs/anneal --init-from runs/main --init-weights-only \\
      data.mix=data/anneal-mix.yaml train.warmup_steps=100 train.decay_start_step=100 train.max_steps=5000
The run records its data paths absolute (OUT/config.yaml, checkpoints), so `--resume` works from any directory;
a checkpoint trained with another tokenizer than data.tokenizer is refused (see --allow-new-tokenizer).
Ctrl-C or SIGTERM stops after the current step with a checkpoint (exit 130 / 143; --resume continues it);
a second Ctrl-C stops at once.
"""

EPILOG = """Every config key, with its type, default and meaning, and how overrides and lists are written:
docs/configuration.md. Tokens per optimizer step = train.micro_batch_size x train.grad_accum_steps x ranks x
train.seq_len; `felix info --config C` prints them, the checkpoint size and the disk the run needs, and
`felix plan --config C` the days.
"""


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("train", help=help, description=HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (model, train, data); with --resume the default is the run's own "
                                    "OUT/config.yaml, so a resume needs only --out (and any overrides)")
    p.add_argument("--out", required=True,
                   help="run directory: metrics.jsonl, checkpoints/, config.yaml (one with checkpoints needs --resume; "
                        "one run at a time: a second is refused while the first holds OUT/.lock)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init-from",
                   help="start from another run's checkpoint (weights, optimizer, data position: same seq_len and mix)")
    p.add_argument("--init-weights-only", action="store_true",
                   help="with --init-from: take only its weights; step, optimizer, RNG and data start fresh")
    p.add_argument("--allow-new-tokenizer", action="store_true",
                   help="with --init-weights-only: start from weights trained with another tokenizer than "
                        "data.tokenizer (refused otherwise, as --resume and --init-from always refuse it: its "
                        "embeddings were learned for the other token ids)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a line every train.log_every steps)")
    add_json_flag(p)
    add_config_overrides(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; exits 128 + the signal (130 for SIGINT, 143 for SIGTERM) when one stopped the run early."""
    from felix.distributed import barrier
    from felix.errors import FelixError
    from felix.trainer import Trainer

    if args.init_weights_only and not args.init_from:
        raise FelixError("--init-weights-only needs --init-from CHECKPOINT")
    if args.allow_new_tokenizer and not args.init_weights_only:
        raise FelixError("--allow-new-tokenizer needs --init-weights-only (a run continued with --resume or "
                         "--init-from keeps the tokenizer it was trained with)")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    config = args.config
    if config is None:  # a resume of a run as it was configured, overrides on top
        config = Path(args.out) / "config.yaml"
        if not args.resume:
            raise FelixError("--config is required (with --resume it defaults to the run's OUT/config.yaml)")
        if not config.is_file():
            raise FelixError(f"{config}: no run config here to resume from; give --config")
    cfg = load_config(config, overrides)
    if args.config is None:
        _note_relative_paths(config, cfg)
    if args.resume:
        _check_data_paths(cfg, config, bool(overrides), args.out)
    trainer = Trainer(cfg, Path(args.out), resume=args.resume,
                      init_from=Path(args.init_from) if args.init_from else None,
                      init_weights_only=args.init_weights_only, progress=not args.no_progress,
                      allow_new_tokenizer=args.allow_new_tokenizer)
    try:
        result = trainer.run()
        if trainer.dist.is_main:
            _report(result, args.json, cfg.train.grad_clip)
        if result.interrupted:
            # rank 0 has reported before any rank exits: torchrun stops the others once one exits non-zero
            barrier(trainer.dist)
    finally:
        trainer.close()
    return 128 + result.interrupted if result.interrupted else 0


def _check_data_paths(cfg: FelixConfig, config: Path | str, overridden: bool, out: str) -> None:
    """On --resume: the data files the run's config names must still be there. When the data moved, the loaders'
    "not found" alone leaves the user to guess that overrides on --resume point the run at the new place."""
    from felix.config import PATH_FIELDS
    from felix.errors import FelixError

    what = {"data.tokenizer": "tokenizer", "data.mix": "data mix"}
    missing = {}
    for section, fields in PATH_FIELDS.items():
        for f in fields:
            if (v := getattr(getattr(cfg, section), f)) and not Path(v).is_file():
                missing[f"{section}.{f}"] = v
    if missing:
        found = "; ".join(f"{what.get(k, k)} not found: {v} ({k})" for k, v in missing.items())
        fix = " ".join(f"{k}=NEW/{Path(v).name}" for k, v in missing.items())
        source = f"{config} and the overrides" if overridden else str(config)
        raise FelixError(f"{found}, as {source} name{'s' * (not overridden)} it; if the data moved, resume with "
                         f"its new place (NEW: where it is now): felix train --out {out} --resume {fix}")


def _note_relative_paths(config: Path, cfg: FelixConfig) -> None:
    """Warn when a run's own config.yaml holds relative paths that `cfg` (it, overrides on top) still uses: runs
    recorded them as given before they recorded them absolute, and they are read against the working directory,
    which may not be the one the run was started in."""
    import warnings

    from felix.config import PATH_FIELDS

    saved = load_config(config)
    relative = [f"{section}.{f}: {v}" for section, fields in PATH_FIELDS.items() for f in fields
                if (v := getattr(getattr(saved, section), f)) and not Path(v).is_absolute()
                and getattr(getattr(cfg, section), f) == v]
    if relative:
        warnings.warn(f"{config}: relative paths ({'; '.join(relative)}), read against the working directory "
                      f"{Path.cwd()}; resuming from the directory the run was started in finds the run's files "
                      f"(this resume records them absolute)", stacklevel=2)


def _report(result: TrainResult, as_json: bool, grad_clip: float) -> None:
    """The run's summary on stdout (`--json`: one object, alone on stdout); a stop on a signal also on stderr."""
    from felix.metrics import grad_norm_summary, read_metrics
    from felix.train_control import stop_message

    summary = {
        "out_dir": str(result.out_dir), "steps": result.steps, "tokens": result.tokens,
        "final_loss": result.final_loss, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
        "tok_per_s": result.tok_per_s, "mfu": result.mfu, "params": result.params,
        "seconds": result.seconds, "skipped_steps": result.skipped_steps,
        "flops_per_token": result.flops_per_token, "peak_flops": result.peak_flops,
        "world_size": result.world_size,
        "interrupted": signal.Signals(result.interrupted).name if result.interrupted else None,
        "max_steps": result.max_steps, "trained_steps": result.trained_steps,
        # over the whole run's logged steps, as its metrics.jsonl holds them (earlier runs into --out included)
        "grad_norm": grad_norm_summary(read_metrics(result.out_dir / "metrics.jsonl"), grad_clip),
    }
    if result.interrupted:
        # the command to copy: --out is required, and a single process would resume a torchrun run on one rank
        how = f"`felix train --out {shlex.quote(str(result.out_dir))} --resume`"
        how += f" under torchrun ({result.world_size} ranks, as this run)" if result.world_size > 1 else ""
        print(f"felix train: {stop_message(result, f'{how} continues it')}", file=sys.stderr)
    idle = None
    if not result.trained_steps and not result.interrupted:  # a finished run resumed: no "0 tok/s" to report
        idle = f"nothing to train: {result.out_dir} is at step {result.steps} of max_steps {result.max_steps}"
    if as_json:
        if idle:
            print(f"felix train: {idle}", file=sys.stderr)  # stdout holds the JSON object alone
        print_json(summary)
    elif idle:
        print(f"{idle}; loss {_fmt(result.final_loss)}, val {_fmt(result.val_loss)}")
    else:
        # a resumed run took only some of its steps here; its tokens count from its start
        n = result.trained_steps
        took = f"trained {n} step{'s' * (n != 1)}" + (
            f", {result.tokens:,} tokens" if n == result.steps else
            f" (to step {result.steps}, {result.tokens:,} tokens in all)")
        print(f"{took} in {result.seconds:.1f}s; loss {_fmt(result.final_loss)}, val {_fmt(result.val_loss)}, "
              f"{result.tok_per_s:,.0f} tok/s")


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"
