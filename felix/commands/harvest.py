"""`felix harvest`: ask teacher models the task suite; export training data; compare teachers."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag

ACTIONS = ("run", "status", "export", "diff")


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "harvest", help=help,
        description="run (default): ask every configured teacher every configured item; answers go to a SQLite "
                    "store keyed by content hash, so re-running never pays twice and a killed run resumes. "
                    "status: requests, cost and gate passes per teacher. export: chat-format JSONL per task and "
                    "teacher (gate-passing answers only unless --include-failing), for `felix data shard` to "
                    "make a mix source of. diff: compare teachers. "
                    "export and diff take only the answers the config asks for now. "
                    "API keys are read from the environment variables the config names, never from files.")
    add_teacher_run_options(p, ACTIONS, "harvest YAML (teachers, store, items)", "retry.max_attempts=5")
    p.add_argument("--limit", type=int, help="run: only the first N items")
    p.add_argument("--out", help="export: output directory")
    p.add_argument("--include-failing", action="store_true", help="export: also answers the gate failed")
    p.set_defaults(func=run)


def add_teacher_run_options(p: argparse.ArgumentParser, actions: tuple[str, ...], config_help: str,
                            override_example: str) -> None:
    """The options `felix harvest` and `felix synth` share: action, config, overrides, teachers, output."""
    p.add_argument("action", nargs="?", choices=actions, default="run", help="what to do (default: run)")
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. {override_example} (repeatable)")
    p.add_argument("--teacher", action="append", help="run: only this teacher (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="run: ask again requests that were given up")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(p)


def _print_totals(totals: dict) -> None:
    print(f"{'teacher':36s} {'ok':>6s} {'pass':>6s} {'failed':>6s} {'gave_up':>7s} {'pending':>7s} {'tokens':>10s} "
          f"{'cost $':>9s}")
    for t, v in sorted(totals.items()):
        print(f"{t:36s} {v['ok']:6d} {v['gate_passed']:6d} {v['failed']:6d} {v['gave_up']:7d} {v['pending']:7d} "
              f"{v['input_tokens'] + v['output_tokens']:10d} {v['cost_usd']:9.4f}")


def _print_reasons(reasons: dict) -> None:
    """Each teacher's most common failure reasons: a refused key is otherwise only a count in `gave_up`."""
    if reasons:
        print("most common reasons requests are failed or given up:")
    for t, rs in sorted(reasons.items()):
        for r in rs:
            print(f"  {t:36s} {r['requests']:6d}  {r['reason']}")


def _print_not_in_config(n: int) -> None:
    if n:
        print(f"left out {n} stored answers that this config does not ask for "
              "(other items, tasks, teachers, prompt versions or teacher settings)")


def reported_run(run: Callable[[], dict], report: Callable[[dict, bool], None], as_json: bool) -> None:
    """`run()` and `report` its result; a run a signal stopped is reported too (its `partial` result: the answers
    stored before the stop are paid for), then the stop goes on."""
    try:
        result = run()
    except KeyboardInterrupt as exc:
        if hasattr(exc, "partial"):
            report(exc.partial, as_json)
        raise
    report(result, as_json)


def _report_run(result: dict, as_json: bool) -> None:
    """`felix harvest run`'s summary on stdout; `--json`: one object, also when a signal stopped it."""
    if as_json:
        print_json(result)
        return
    r = result["run"]
    stopped = f" (stopped by {result['interrupted']})" if result["interrupted"] else ""
    # answers and attempts, not requests: a request answered malformed and asked again counts each time
    print(f"asked {r['owed']} of {result['requests']} requests{stopped}: {r['ok']} good answers, {r['malformed']} "
          f"malformed answers, {r['failed']} attempts unanswered, ${r['cost_usd']:.4f} this run  "
          f"(store {result['store']})")
    print_stopped_teachers(r)
    _print_totals(result["totals"])
    _print_reasons(result.get("reasons", {}))


def print_stopped_teachers(run: dict) -> None:
    """The teachers a run stopped asking (a refused key, credit or model), and why."""
    for name, reason in run.get("stopped_teachers", {}).items():
        print(f"teacher {name} was stopped: {reason}. Its requests stay owed: fix it and run again")


def run(args: argparse.Namespace) -> int:
    from felix.errors import FelixError
    from felix.harvest import configured_keys, run_harvest
    from felix.harvest_config import load_harvest_config
    from felix.harvest_report import compare_teachers, export_training
    from felix.harvest_store import HarvestStore

    cfg = load_harvest_config(args.config, args.overrides)
    if args.action == "run":
        if args.limit is not None and args.limit < 1:
            raise FelixError(f"--limit must be at least 1, got {args.limit}")
        progress = not args.no_progress and not args.json
        reported_run(lambda: run_harvest(cfg, teachers=args.teacher, limit=args.limit,
                                         retry_failed=args.retry_failed, progress=progress), _report_run, args.json)
        return 0
    if not cfg.store_path.is_file():
        raise FelixError(f"{cfg.store_path}: no harvest store yet; run `felix harvest --config {args.config}` first")
    with HarvestStore(cfg.store_path) as store:
        if args.action == "status":
            result = {"store": str(cfg.store_path), "totals": store.totals("harvest"),
                      "reasons": store.failure_reasons("harvest")}
            if not args.json:
                _print_totals(result["totals"])
                _print_reasons(result["reasons"])
        elif args.action == "export":
            if not args.out:
                raise FelixError("export needs --out DIR")
            result = export_training(store, Path(args.out), configured_keys(cfg), include_failing=args.include_failing)
            if not args.json:
                for path, n in result["files"].items():
                    print(f"{n:6d}  {path}")
                print(f"{result['written']} examples written; {result['skipped_failing']} gate-failing answers "
                      "left out")
                for path in result["removed"]:
                    print(f"removed {path}: an earlier export wrote it, and this one has nothing for it")
                for path in result["unlisted"]:
                    print(f"note: {path} was not written by this export (nor listed by an earlier one) and is left "
                          "as it is; remove it if it is an old export's")
                _print_not_in_config(result["not_in_config"])
        else:
            result = compare_teachers(store, configured_keys(cfg))
            if not args.json:
                print(json.dumps(result, indent=2))
                _print_not_in_config(result["not_in_config"])
    if args.json:
        print_json(result)
    return 0
