#!/usr/bin/env python
"""EXP-46ak exploration: the share of a single edit's write on held-out neighbours' *answers*, for preservation
prompts' moments over their next token alone or over the positions of their first n greedy tokens.

As `scripts/prompt_moment_leak.py` (unit write at the edit's key, nothing protected, layer 5), with
N over the preservation prompts file (the edits' `STEM.preserve.jsonl`) at `prompt_tokens` 1 and n
(`prompt_moment`), for weights β. The share is read at every held-out neutral prompt's last position
(`first`) and at the positions predicting its 2nd..4th greedy tokens (`rest`).

    python scripts/prompt_answer_leak.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/facts-wide4-s0-preserve.jsonl runs/exp46ak-leak.json --n 20 [--uniform]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from felix.atomic import atomic_write_text
from felix.model_loader import load_model
from felix.splice_bench import neutral_pool
from felix.splice_closed import solve_a_update
from felix.splice_covariance import input_covariance, inputs_at_targets, prompt_moment
from felix.splice_data import examples_of, load_prompts, splice_texts
from felix.splice_edit import load_requests
from felix.splice_examples import Example, greedy_continuations

BETAS = (0.0, 3.0, 10.0, 30.0)
RIDGE = 1e-2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--uniform", action="store_true",
                    help="every answer position weighs the same (the exploration's first variant), not the "
                         "next token as much as the rest together (prompt_moment)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    L = args.layer

    model, tok, ckpt = load_model(args.checkpoint)
    _, preserve = splice_texts(ckpt, model)
    every = load_requests(args.edits)
    pool, _ = neutral_pool(model, tok, every)
    held = pool[1::2]
    held_text = {tok.decode(p) for p in held}
    cov = input_covariance(model, [L], preserve)[L].double()
    conts = greedy_continuations(model, held, args.tokens)
    pairs = list(zip(held, conts, strict=True))
    u_first = inputs_at_targets(model, [L], [Example((*p, c[0]), len(p)) for p, c in pairs])[L].double()
    u_rest = inputs_at_targets(model, [L], [Example((*p, *c), len(p) + 1) for p, c in pairs])[L].double()

    prompts = [tok.encode(p) for p in load_prompts(args.prompts) if p not in held_text]
    moments = {1: prompt_moment(model, [L], prompts)[L].double()}
    answers = greedy_continuations(model, prompts, args.tokens)
    if args.uniform:
        u = inputs_at_targets(model, [L], [Example((*p, *c), len(p)) for p, c in zip(prompts, answers, strict=True)])
        moments[args.tokens] = (u[L] @ u[L].t() / u[L].shape[1]).double()
    else:
        moments[args.tokens] = prompt_moment(model, [L], prompts, answers)[L].double()

    rows: dict[str, list[tuple[float, float, float]]] = {}
    for req in every[: args.n]:
        ex, _ = examples_of(tok, req, model.cfg.max_seq_len)
        key = inputs_at_targets(model, [L], [ex])[L][:, :1]
        for tokens, moment in moments.items():
            for beta in BETAS:
                c = cov + beta * float(cov.trace()) / float(moment.trace()) * moment
                da = solve_a_update(torch.ones(1, 1), key, torch.zeros(key.shape[0], 0), c, RIDGE).double()
                rows.setdefault(f"tokens={tokens} beta={beta:g}", []).append(
                    (float((da @ u_first).abs().mean()), float((da @ u_rest).abs().mean()),
                     float((da @ cov @ da.t()).sqrt())))
        print(req.id, flush=True)

    summary = {k: {"first_mean_abs_share": float(np.mean([r[0] for r in v])),
                   "rest_mean_abs_share": float(np.mean([r[1] for r in v])),
                   "text_rms_per_unit": float(np.mean([r[2] for r in v]))} for k, v in rows.items()}
    summary |= {"edits": min(args.n, len(every)), "heldout_prompts": len(held), "prompts": len(prompts)}
    atomic_write_text(args.out, json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
