#!/usr/bin/env python
"""Held-out neighbours' final locality per fact relation, from benches' `locality_breaks` (EXP-46am).

For each bench.json (a `felix splice bench --heldout-neutral` run on `EDITS`), the held-out prompts (the
pool's odd ones) are grouped by the relation whose template wrote them (felix.facts), and each group's
share whose greedy next token / 4-token continuation is unchanged at the end is printed. A break's next
token is its `next_token_changed`, or, in benches written before that field, the first token of its
re-encoded `before` and `after` texts (one prompt off on some); the totals are checked against the bench's
own `heldout_neutral` rates.

    python scripts/locality_by_relation.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/exp46ah-a/bench.json runs/exp46ai-w3/bench.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from felix.facts import TEMPLATES, stdlib_facts
from felix.model_loader import load_model
from felix.splice_edit import load_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("benches", nargs="+")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    _, tok, _ = load_model(args.checkpoint)
    relation = {f.prompt(t)[0]: f.relation for f in stdlib_facts() for t in TEMPLATES[f.relation]}
    pool = list(dict.fromkeys(n for r in load_requests(args.edits)[: args.n] for n in r.neutral))
    held = pool[1::2]
    groups = Counter(relation[p] for p in held)
    for path in args.benches:
        final = json.loads(Path(path).read_text(encoding="utf-8"))["final"]
        breaks = {b["prompt"]: b for b in final["locality_breaks"]}
        broken, broken_next = Counter(), Counter()
        for p in held:
            b = breaks.get(p.split("\n")[-1][-60:])
            if b is not None:
                broken[relation[p]] += 1
                changed = b.get("next_token_changed")  # benches before 2026-12-03 lack it
                if changed is None:
                    changed = tok.encode(b["before"])[:1] != tok.encode(b["after"])[:1]
                broken_next[relation[p]] += changed
        got = 1 - sum(broken_next.values()) / len(held)
        want = final["heldout_neutral"]["locality_next_token_rate"]
        rows = {g: {"prompts": n, "next_token": round(1 - broken_next[g] / n, 3),
                    "4_token": round(1 - broken[g] / n, 3)} for g, n in groups.most_common()}
        print(json.dumps({"bench": path, "next_token": round(got, 4), "bench_next_token": round(want, 4),
                          "4_token": round(1 - sum(broken.values()) / len(held), 4),
                          "bench_4_token": round(final["heldout_neutral"]["locality_rate"], 4),
                          "by_relation": rows}))


if __name__ == "__main__":
    main()
