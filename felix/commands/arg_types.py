"""argparse value types and flags shared by the verbs."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_BYTE_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


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


def byte_size(text: str) -> int:
    """argparse type: a positive number of bytes, as 2G, 500M, 1.5GB (powers of 1000, as felix prints sizes) or
    2GiB (powers of 1024)."""
    m = _BYTE_SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r} (e.g. 500M, 2G, 1.5GB, 2GiB)")
    number, prefix, binary = m.groups()
    if binary and not prefix:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r} (\"i\" follows k, M, G or T)")
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    n = int(float(number) * (1024 if binary else 1000) ** power)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return n


def add_config_overrides(parser: argparse.ArgumentParser) -> None:
    """The positional `section.key=value` config overrides the verbs that read a run config take."""
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value, e.g. train.max_steps=100 (repeatable)")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json`, the machine-readable contract every verb that reports figures keeps (tests/test_cli_contract.py)."""
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object, alone on stdout (messages go to stderr)")
