"""argparse value types shared by the verbs."""

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
