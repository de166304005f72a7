"""The `felix` command: one verb per pipeline stage, each defined in `felix.commands.<verb>`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from felix.errors import FelixError

# Verb modules, in pipeline order. Each has `register(subparsers)` which adds its parser and
# sets `func=handler(args) -> int`.
COMMAND_MODULES = [
    "felix.commands.demo",
    "felix.commands.data",
    "felix.commands.tokenizer",
    "felix.commands.train",
    "felix.commands.generate",
    "felix.commands.quantize",
    "felix.commands.quant",
    "felix.commands.export",
    "felix.commands.splice",
    "felix.commands.serve",
    "felix.commands.validate",
    "felix.commands.harvest",
    "felix.commands.synth",
    "felix.commands.info",
    "felix.commands.plan",
    "felix.commands.bench",
]


def print_json(obj: Any) -> None:
    """Print one JSON object as the last line of stdout (the `--json` contract)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="felix", description=__doc__)
    from felix import __version__

    parser.add_argument("--version", action="version", version=f"felix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<verb>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except FelixError as exc:
        print(f"felix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
