"""argparse value types and flags shared by the verbs."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(least: int) -> Callable[[str], int]:
    """argparse type: an int >= `least` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {n}")
        return n
    return parse


def add_config_overrides(parser: argparse.ArgumentParser) -> None:
    """The positional `section.key=value` config overrides the verbs that read a run config take."""
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value, e.g. train.max_steps=100 (repeatable)")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json`, the machine-readable contract every verb that reports figures keeps (tests/test_cli_contract.py)."""
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object, alone on stdout (messages go to stderr)")
