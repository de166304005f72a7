"""`felix demo`: the whole recipe at toy scale on this machine, with nothing downloaded."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_config_overrides, add_json_flag

HELP = """Build a corpus from the Python standard library (plus the shipped task-suite samples), train a
byte-level BPE tokenizer, write shards and a data mix, train a small FelixLM with the real recipe
(WSD schedule, SpliceCore, checkpoints) and write DIR/report.md, report.json and loss.png.

Stages whose output exists are skipped, so re-running continues an interrupted demo (a second demo into DIR
while one runs is refused). The report's wall time adds up every run into DIR, interrupted ones included
(DIR/wall_time.json).
"""


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("demo", help=help, description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="demo directory")
    p.add_argument("--config", default="demo", help="run config (default: the packaged demo config)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="train fewer steps where the configured ones would not fit this many minutes in all "
                        "(default 8; 0: no budget; --max-steps sets the steps exactly)")
    p.add_argument("--corpus-mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    p.add_argument("--facts-weight", type=float, default=0.0,
                   help="mix share of the `facts` source: statements of the standard library's tables, the "
                        "facts `splice make-edits --source facts` edits (default 0: no such source)")
    p.add_argument("--no-progress", action="store_true",
                   help="no training progress (a bar on a terminal, else a line every train.log_every steps)")
    add_json_flag(p)
    add_config_overrides(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from felix.demo import DEFAULT_BUDGET_MINUTES, run_demo
    from felix.errors import FelixError

    if args.budget_minutes is not None and not args.budget_minutes >= 0:
        raise FelixError(f"--budget-minutes must be >= 0 (0: no budget), got {args.budget_minutes}")
    if not 0 < args.corpus_mb < math.inf:  # NaN fails both
        raise FelixError(f"--corpus-mb must be a positive number of MB, got {args.corpus_mb}")
    if not 0 <= args.facts_weight < math.inf:
        raise FelixError(f"--facts-weight must be >= 0, got {args.facts_weight}")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    result = run_demo(Path(args.out), args.config, overrides, corpus_bytes=int(args.corpus_mb * 1e6),
                      progress=not args.no_progress, facts_weight=args.facts_weight,
                      budget_minutes=DEFAULT_BUDGET_MINUTES if args.budget_minutes is None else args.budget_minutes)
    r = result.report
    if args.json:
        print_json(r | {"out_dir": str(result.out_dir)})
    else:
        wall = r["wall_time"]
        over = f" ({wall['seconds']:.0f}s over {wall['runs']} runs into {result.out_dir})" if wall["runs"] > 1 else ""
        val = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(f"demo finished in {r['stage_seconds']['total']:.0f}s{over}: {r['params']:,} parameters, "
              f"{r['tokens_seen']:,} tokens, val loss {val}")
        print(f"report: {result.out_dir / 'report.md'}")
    return 0
