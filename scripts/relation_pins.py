#!/usr/bin/env python
"""EXP-46ab: pin each entity-fact edit's same-relation neighbours, and measure the neighbours no edit pins.

`build`: from an edit set made by `felix splice make-edits --source facts` and the neutral pool its bench
used with `--heldout-neutral`, write a new set of the same edits whose neutral prompts (each protected
exactly by its edit, as `closed_form_a` protects a request's neutral prompts) are the shown half of the old
ones plus `--pins` prompts of the edit's own template with other subjects: facts neither edited nor in the
old pool, so the old held-out half stays unseen by every edit.

`measure`: the old held-out half's next-token and 4-token locality under each kept stack given, against
the checkpoint's own continuations, measured side by side.

    python scripts/relation_pins.py build runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/facts-wide4-pins8.jsonl --pins 8
    python scripts/relation_pins.py measure runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl out.json \\
        runs/exp46y-a/stack runs/exp46ab/stack
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from felix.facts import TEMPLATES, Fact, stdlib_facts
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.splice_bench import neutral_pool, next_token_examples
from felix.splice_edit import load_requests, save_requests
from felix.splice_examples import Example, greedy_continuations, greedy_hits


def heldout_half(model, tok, requests) -> tuple[list[str], list[str]]:
    """The bench's neutral pool as prompts, split as `--heldout-neutral` splits it: (shown, held out)."""
    pool, _ = neutral_pool(model, tok, requests)
    text = {tuple(tok.encode(p)): p for r in requests for p in r.neutral}
    prompts = [text[tuple(ids)] for ids in pool]
    return prompts[::2], prompts[1::2]


def template_of(fact_rel: str, subject: str, prompt: str) -> str:
    return next(t for t in TEMPLATES[fact_rel] if Fact(fact_rel, subject, "").prompt(t)[0] == prompt)


def build(args) -> None:
    model, tok, _ = load_model(args.checkpoint)
    requests = load_requests(args.edits)[: args.n]
    shown, hidden = heldout_half(model, tok, requests)
    used = set(shown) | set(hidden)
    facts = stdlib_facts()
    edited = {tuple(r.id.split("/", 1)) for r in requests}
    free = [f for f in facts if (f.relation, f.subject) not in edited
            and not any(f.prompt(t)[0] in used for t in TEMPLATES[f.relation])]
    rng = random.Random(args.seed)
    out = []
    for r in requests:
        rel, subject = r.id.split("/", 1)
        template = template_of(rel, subject, r.prompt)
        near = [f for f in free if f.relation == rel]
        pins = [f.prompt(template)[0] for f in rng.sample(near, min(args.pins, len(near)))]
        out.append(type(r)(r.prompt, r.target, r.paraphrases, [p for p in r.neutral if p in set(shown)] + pins,
                           id=r.id))
    save_requests(args.out, out)
    print(json.dumps({"edits": len(out), "shown": len(shown), "held_out": len(hidden), "free_facts": len(free),
                      "pins_per_edit": args.pins}))


def measure(args) -> None:
    torch.set_grad_enabled(False)
    model, tok, _ = load_model(args.checkpoint)
    requests = load_requests(args.edits)[: args.n]
    _, hidden = heldout_half(model, tok, requests)
    ids = [tok.encode(p) for p in hidden]
    examples = [Example(tuple(p) + c, len(p)) for p, c in zip(ids, greedy_continuations(model, ids, 4), strict=True)]
    state0 = model.splice_state()
    result = {"held_out_prompts": len(ids)}
    for stack in args.stacks:
        model.load_splice_state(state0)
        PatchStack.open(stack).restore(model)
        result[stack] = {"applied": len(PatchStack.open(stack).list()),
                         "next_token": sum(greedy_hits(model, next_token_examples(examples))) / len(ids),
                         "four_tokens": sum(greedy_hits(model, examples)) / len(ids)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build")
    b.add_argument("checkpoint")
    b.add_argument("edits")
    b.add_argument("out")
    b.add_argument("--pins", type=int, default=8)
    b.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure")
    m.add_argument("checkpoint")
    m.add_argument("edits")
    m.add_argument("out")
    m.add_argument("stacks", nargs="+")
    for p in (b, m):
        p.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    build(args) if args.verb == "build" else measure(args)


if __name__ == "__main__":
    main()
