#!/usr/bin/env python
"""How many held-out neighbours a bench broke, by their margin on the unedited model (EXP-46ak).

The margin is the top-1 minus top-2 log-probability of the prompt's next token. Held-out prompts are the
pool's odd ones, as `felix splice bench --heldout-neutral` keeps them; a prompt counts as broken when the
bench's `locality_breaks` says its next token changed at some step.

    python scripts/heldout_margins.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/exp46ai-w3/bench.json runs/exp46ak-t3/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from felix.model_loader import load_model
from felix.splice_bench import neutral_pool
from felix.splice_edit import load_requests
from felix.splice_examples import last_logprobs

THRESHOLDS = (0.1, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("benches", nargs="+", help="bench.json files of runs on these edits")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok, _ = load_model(args.checkpoint)
    pool, _ = neutral_pool(model, tok, load_requests(args.edits)[: args.n])
    top = last_logprobs(model, pool).topk(2, dim=-1).values
    margin = (top[:, 0] - top[:, 1]).tolist()
    held = [j for j in range(len(pool)) if j % 2]
    texts = [tok.decode(p) for p in pool]
    for path in args.benches:
        final = json.loads(Path(path).read_text(encoding="utf-8"))["final"]
        broken = {b["prompt"] for b in final["locality_breaks"] if b["next_token_first_changed"]}
        hit = [j for j in held if texts[j] in broken]
        row = {"bench": path, "heldout": len(held), "broken": len(hit)}
        for th in THRESHOLDS:
            row[f"margin<{th}"] = {"heldout": sum(margin[j] < th for j in held),
                                   "broken": sum(margin[j] < th for j in hit)}
        row["broken_margin_median"] = sorted(margin[j] for j in hit)[len(hit) // 2] if hit else None
        print(json.dumps(row))


if __name__ == "__main__":
    main()
