#!/usr/bin/env python
"""What the neutral prompts a kept fact-edit stack broke say now, and how sure the model was before.

For an entity-fact stack (`felix splice make-edits --source facts`, kept by `felix splice bench
--keep-patches DIR`): each neutral prompt of the bench's pool gets its step-0 margin (top-1 minus top-2
log-probability of its next token) and whether the whole stack changed its next token. For the broken ones:
whether the new greedy continuation starts with the whole target of an edit, and whether that edit is of
the prompt's own relation (the prompt matches one of the relation's templates). Near-ties flip under any
perturbation; a neighbour that now says an edit's object has taken the edit itself.

    python scripts/locality_bleed.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl runs/exp46y-a/stack out.json
The findings are in docs/splicing.md ("Where locality goes").
"""

from __future__ import annotations

import json
import re
import statistics

from kept_stack import kept_stack_args

from felix.facts import TEMPLATES
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.splice_bench import neutral_pool, next_token_examples
from felix.splice_data import examples_of
from felix.splice_edit import load_requests
from felix.splice_examples import greedy_continuations, greedy_hits, last_logprobs


def relation_of(prompt: str) -> str | None:
    """The relation whose template, cut before the object, the prompt is (None if none is)."""
    for rel, templates in TEMPLATES.items():
        for t in templates:
            head = t.split("{o}")[0].rstrip()
            pattern = re.escape(head).replace(re.escape("{s}"), ".+")
            if re.fullmatch(pattern, prompt):
                return rel
    return None


def quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else xs * 3
    return {"n": len(xs), "p25": q[0], "median": q[1], "p75": q[2]}


def main() -> None:
    args = kept_stack_args(__doc__)
    model, tok, _ = load_model(args.checkpoint)
    requests = load_requests(args.edits)[: args.n]
    pool, neutral = neutral_pool(model, tok, requests)
    lp0 = last_logprobs(model, pool)
    top2 = lp0.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    PatchStack.open(args.stack).restore(model)
    kept = greedy_hits(model, next_token_examples(neutral))
    broken = [j for j, k in enumerate(kept) if not k]
    now = greedy_continuations(model, [pool[j] for j in broken], 4)
    applied = {p.record["request"]["id"] for p in PatchStack.open(args.stack).list() if "request" in p.record}
    targets = [(r.id.split("/")[0], examples_of(tok, r, model.cfg.max_seq_len)[0].target)
               for r in requests if r.id in applied]
    takes, same = 0, 0
    for j, cont in zip(broken, now, strict=True):
        rels = {rel for rel, t in targets if tuple(cont[: len(t)]) == tuple(t)}
        takes += bool(rels)
        same += relation_of(tok.decode(pool[j])) in rels
    bins = [(0, 0.5), (0.5, 1), (1, 2), (2, 4), (4, float("inf"))]
    out = {"pool": len(pool), "next_token_kept": sum(kept),
           "step0_margin_broken": quartiles([margin[j] for j in broken]),
           "step0_margin_kept": quartiles([m for m, k in zip(margin, kept, strict=True) if k]),
           "kept_by_step0_margin": {f"{a}-{b}": [sum(a <= m < b for m in margin),
                                                 sum(a <= m < b and k for m, k in zip(margin, kept, strict=True))]
                                    for a, b in bins},
           "broken_now_saying_an_edit_target": takes, "of_an_edit_of_its_own_relation": same}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
