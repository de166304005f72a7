#!/usr/bin/env python
"""Splice benches side by side, as the Markdown table the EXP-46 results use.

Each argument is LABEL=PATH to a `felix splice bench --json --out DIR` run's DIR/bench.json (`final` is read).
A figure a bench did not measure (no --heldout-neutral, no re-quantization) shows as a dash.

    python scripts/bench_table.py --title "117.89M, 100 fact edits" "P, seed 0=runs/exp46aw-s0/bench.json" \
        "P, seed 1=runs/exp46aw-s1/bench.json"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SOURCES = ("code", "docs", "tasks", "facts")


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def signed(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f}%"


def get(r: dict, *keys: str) -> Any:
    """r[k0][k1]..., None where any is missing."""
    for k in keys:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("applied", lambda r: f"{r['applied']}/{r['n']}"),
    ("success / retention", lambda r: f"{pct(r['success_rate'])} / {pct(r['retention_rate'])}"),
    ("held-out next-token locality", lambda r: f"{pct(get(r, 'heldout_neutral', 'locality_next_token_rate'))} "
                                               f"({get(r, 'heldout_neutral', 'prompts')})"),
    ("held-out 4-token locality", lambda r: pct(get(r, "heldout_neutral", "locality_rate"))),
    ("shown next / 4-token", lambda r: f"{pct(get(r, 'shown_neutral', 'locality_next_token_rate'))} / "
                                       f"{pct(get(r, 'shown_neutral', 'locality_rate'))}"),
    ("whole pool next / 4-token", lambda r: f"{pct(r['locality_next_token_rate'])} / {pct(r['locality_rate'])}"),
    ("whole-mix drift", lambda r: signed(r["ppl_drift"])),
    ("drift " + " / ".join(SOURCES), lambda r: " / ".join(signed(get(r, "ppl_drift_by_source", s)) for s in SOURCES)),
    ("retention after GPTQ / plain RQ4", lambda r: f"{pct(get(r, 'requantized_gptq', 'retention_rate'))} / "
                                                   f"{pct(get(r, 'requantized', 'retention_rate'))}"),
    ("held-out next after GPTQ / plain", lambda r: " / ".join(
        pct(get(r, q, "heldout_neutral", "locality_next_token_rate")) for q in ("requantized_gptq", "requantized"))),
    ("neutral KL", lambda r: f"{r['neutral_kl']:.3f}"),
    ("paraphrase", lambda r: pct(r["paraphrase_rate"])),
    ("preserve prompts kept", lambda r: pct(r.get("preserve_prompts_kept"))),
    ("minutes", lambda r: f"{r['seconds'] / 60:.0f}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="+", metavar="LABEL=PATH")
    ap.add_argument("--title", default="100 edits")
    args = ap.parse_args()
    arms = {}
    for arg in args.benches:
        label, sep, path = arg.rpartition("=")
        if not sep or not label:
            ap.error(f"{arg!r}: give LABEL=PATH")
        arms[label] = json.loads(Path(path).read_text(encoding="utf-8"))["final"]
    print(f"| {args.title} | " + " | ".join(arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for name, cell in ROWS:
        print(f"| {name} | " + " | ".join(cell(r) for r in arms.values()) + " |")
    for label, r in arms.items():
        print(f"{label}: rejections {r['rejections']}")


if __name__ == "__main__":
    main()
