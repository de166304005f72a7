#!/usr/bin/env python
"""How many of the standard library's facts (felix.facts) a checkpoint holds, by relation (EXP-46au, EXP-46aw).

A fact is held when the model's greedy completion of its prompt is its object (`held_prompts`). The count
with make-edits' habit filter leaves out facts whose object follows the prompt's last token in ≥ 5% of the
training text. The pre-registrations cut the edits to 50 below 306 held facts.

    python scripts/held_facts.py runs/demo-facts-53m/run
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from felix.facts import stdlib_facts
from felix.model_loader import load_model
from felix.prefix_memo import prefix_memo
from felix.splice_data import NextTokenShares
from felix.splice_facts import held_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run dir, checkpoint dir or quantized artifact")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    args = parser.parse_args()
    model, tok, ckpt = load_model(args.checkpoint, args.device)
    facts = stdlib_facts()
    shares = NextTokenShares.of_checkpoint(ckpt, model.cfg.vocab_size)
    with prefix_memo(model):  # the second pass reads the same prompts: only the last SpliceCore block runs again
        held = held_prompts(model, tok, facts)
        filtered = held_prompts(model, tok, facts, shares=shares, max_habit=0.05)
    print(json.dumps({"facts": len(facts), "held": len(held), "held_habit_filtered": len(filtered),
                      "by_relation": dict(Counter(f.relation for f in held))}))


if __name__ == "__main__":
    main()
