#!/usr/bin/env python
"""EXP-46ah exploration: the share of a single edit's write that lands on unseen neighbours, for C plus
a prompt moment, by linear algebra (no forward pass after the write).

For the first `--n` edits at one layer (default 5), Δa = solve_a_update(1, uₑ, [], C′) is the unit write
at the edit's key uₑ (nothing protected), and its share on each held-out neutral prompt n (the half of
the bench's pool that `--heldout-neutral` keeps) is Δa uₙ. C′ = C + β·(tr C / tr N)·N with N the second
moment of the last-token inputs of:

- `facts`: every template's prompt of every fact none of whose prompts is a held-out prompt, less the
  edit's own fact (felix.facts);
- `facts-half`: the same, half of the facts (by a hash of the subject);
- `pins-M`: the edit's M text pins (felix.splice_pins: the training positions the write would reach
  most, held-out prompts withheld), read as prompts.

Reported per variant and β: the mean |share| over held-out prompts, how many get |share| > 0.2, and the
write's RMS over the preservation text per unit (sqrt(Δa C Δaᵀ)).

    python scripts/prompt_moment_leak.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/exp46ah-leak.json --n 20
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import torch

from felix.atomic import atomic_write_text
from felix.facts import TEMPLATES, stdlib_facts
from felix.model_loader import load_model
from felix.splice_bench import neutral_pool
from felix.splice_closed import solve_a_update
from felix.splice_covariance import input_covariance, inputs_at_targets
from felix.splice_data import examples_of, splice_texts
from felix.splice_edit import load_requests
from felix.splice_examples import last_position_examples
from felix.splice_pins import TextPins, pin_windows

BETAS = (0.0, 0.3, 1.0, 3.0)
RIDGE = 1e-2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--pins", default="64,512", help="text pin counts for the pins-M variants ('' for none)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    L = args.layer

    model, tok, ckpt = load_model(args.checkpoint)
    _, preserve = splice_texts(ckpt, model)
    every = load_requests(args.edits)
    pool, _ = neutral_pool(model, tok, every)
    held = pool[1::2]
    held_set = {tuple(p) for p in held}
    cov = input_covariance(model, [L], preserve)[L].double()
    u_held = inputs_at_targets(model, [L], last_position_examples(held))[L].double()

    facts = stdlib_facts()
    by_fact = {f: [tok.encode(f.prompt(t)[0]) for t in TEMPLATES[f.relation]] for f in facts}
    kept = [(f, p) for f, ps in by_fact.items() if not any(tuple(p) in held_set for p in ps) for p in ps]
    half = [(f, p) for f, p in kept if hashlib.blake2b(f.subject.encode()).digest()[0] % 2 == 0]
    sets = {name: (pp, inputs_at_targets(model, [L], last_position_examples([p for _, p in pp]))[L].double())
            for name, pp in (("facts", kept), ("facts-half", half))}
    counts = [int(m) for m in args.pins.split(",") if m]
    pins = TextPins(pin_windows(ckpt, model), tok, [tok.decode(p) for p in held]) if counts else None

    rows: dict[str, list[tuple[float, int, float]]] = {}
    for req in every[: args.n]:
        ex, _ = examples_of(tok, req, model.cfg.max_seq_len)
        key = inputs_at_targets(model, [L], [ex])[L][:, :1]
        subject = req.id.split("/", 1)[1]
        moments = {}
        for name, (pp, u) in sets.items():
            own = [i for i, (f, _) in enumerate(pp) if f.subject != subject]
            moments[name] = u[:, own] @ u[:, own].t() / len(own)
        if counts:
            u = pins.select(model, L, key[:, 0], cov.float(), RIDGE, max(counts),
                            (req.prompt, *req.paraphrases)).double()
            for m in counts:
                moments[f"pins-{m}"] = u[:, :m] @ u[:, :m].t() / u[:, :m].shape[1]
        for name, moment in moments.items():
            for beta in BETAS:
                c = cov + beta * float(cov.trace()) / float(moment.trace()) * moment
                da = solve_a_update(torch.ones(1, 1), key, torch.zeros(key.shape[0], 0), c, RIDGE).double()
                share = (da @ u_held).flatten().abs()
                rows.setdefault(f"{name} beta={beta:g}", []).append(
                    (float(share.mean()), int((share > 0.2).sum()), float((da @ cov @ da.t()).sqrt())))
        print(req.id, flush=True)

    summary = {k: {"mean_abs_share": float(np.mean([r[0] for r in v])),
                   "over_0.2_per_edit": float(np.mean([r[1] for r in v])),
                   "text_rms_per_unit": float(np.mean([r[2] for r in v]))} for k, v in rows.items()}
    summary["edits"] = min(args.n, len(every))
    summary["heldout_prompts"] = len(held)
    summary["prompts"] = {name: len(pp) for name, (pp, _) in sets.items()}
    atomic_write_text(args.out, json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
