#!/usr/bin/env python
"""EXP-46ah probe: does measuring closed_form_a's covariance on prompt-form inputs stop an edit's write
from reaching its unseen neighbours?

`closed_form_a` writes the least-C-energy Δa with C = E[u uᵀ] over every position of the preservation
windows (128-token training windows). An edit's key and the neighbours a user asks about are short
prompts: a line read at its last token with at most a few lines before it. If short prompts share a
direction that window positions seldom take, C⁻¹ weighs it up and every short prompt gets a share of the
write. This probe applies each edit alone to the unedited model, as the bench would apply it first (its
layers as the bench chose them, the request's shown neutral prompts protected), once per covariance, and
counts the held-out neutral prompts (never protected, never used to build anything) whose next token
changed, how far their top token's margin fell (the mean over them of the drop, rises clipped at 0: a
sub-threshold push, which a sequence of edits adds up), with the edit's success and the mix's held-out NLL
change.

Covariances:
- `window`: today's C, every position of the 256 preservation windows;
- `prompt`: u at the last token of prompt-form samples of other training windows (a random position's
  line, cut there, behind at most 3 whole lines), as many samples as `--samples`;
- `mix`: their mean.

    python scripts/prompt_covariance.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/exp46ae-a/bench.json runs/exp46ah-probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from felix.atomic import atomic_write_text
from felix.heldout import heldout_nll
from felix.model_loader import load_model
from felix.splice_bench import neutral_pool
from felix.splice_closed import closed_form_a
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import input_covariance
from felix.splice_data import corpus_windows, examples_of, splice_texts
from felix.splice_edit import load_requests
from felix.splice_examples import greedy_continuations, greedy_hits, last_logprobs
from felix.splice_pins import TextPins, pin_windows

CONTEXT_LINES = 3
SEED = 11  # the prompt samples' windows: neither the preservation windows (1) nor the pins' (7)


def prompt_samples(tok, windows: torch.Tensor, n: int, seed: int) -> list[list[int]]:
    """n prompt-form samples: a random position's line cut there, behind at most CONTEXT_LINES whole lines."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    rows = list(range(len(windows)))
    while len(out) < n:
        row = windows[rng.choice(rows)].tolist()
        col = rng.randrange(1, len(row))
        text = tok.decode(row[: col + 1])
        if "\n" not in text:
            continue
        lines = text.split("\n")
        head, line = lines[1:-1][-CONTEXT_LINES:], lines[-1]  # lines[0] may be cut by the window's start
        if not line.strip():
            continue
        ids = tok.encode("\n".join([*head, line]))
        if len(ids) >= 2:
            out.append(ids)
    return out


@torch.no_grad()
def last_inputs(model, layers: list[int], prompts: list[list[int]], chunk: int = 64) -> dict[int, torch.Tensor]:
    """u at each prompt's last token per layer: (n, d_ff), right-padded batches."""
    us: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for i in range(0, len(prompts), chunk):
        part = prompts[i : i + chunk]
        t = max(len(p) for p in part)
        idx = torch.zeros(len(part), t, dtype=torch.long)
        for j, p in enumerate(part):
            idx[j, : len(p)] = torch.tensor(p)
        got: dict[int, torch.Tensor] = {}
        hooks = [model.layers[L].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, L=L, got=got: got.__setitem__(L, args[0].detach().float())) for L in layers]
        try:
            model.residual_through(idx, max(layers))
        finally:
            for h in hooks:
                h.remove()
        last = torch.tensor([len(p) - 1 for p in part])
        for L in layers:
            us[L].append(got[L][torch.arange(len(part)), last])
    return {L: torch.cat(v) for L, v in us.items()}


@torch.no_grad()
def top_margins(model, prompts: list[list[int]], top: torch.Tensor) -> torch.Tensor:
    """Per prompt: the logit of token `top` minus the largest other logit at its last position."""
    lp = last_logprobs(model, prompts)
    own = lp.gather(1, top[:, None])[:, 0]
    other = lp.scatter(1, top[:, None], float("-inf")).max(1).values
    return own - other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("bench", help="a bench.json of the same edits: each edit's layers as the bench chose them")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--covs", default="window,prompt,mix", help="the covariances compared, comma-separated")
    ap.add_argument("--ridges", default="0.01", help="closed_form_a's a_ridge values, each with every covariance")
    ap.add_argument("--pins", default="0", help="text pin counts (felix.splice_pins), each with every variant above")
    args = ap.parse_args()
    t0 = time.time()

    model, tok, ckpt = load_model(args.checkpoint)
    heldout, preserve = splice_texts(ckpt, model)
    every = load_requests(args.edits)
    requests = every[: args.n]
    with open(args.bench) as f:
        layers_of = {s["id"]: s["layers"] for s in json.load(f)["steps"] if s.get("layers")}
    all_layers = sorted({L for ls in layers_of.values() for L in ls})
    pool, _ = neutral_pool(model, tok, every)
    shown, held = pool[::2], pool[1::2]  # as `felix splice bench --heldout-neutral` splits the pool
    held_next = greedy_continuations(model, held, 1)
    top = torch.tensor([c[0] for c in held_next])
    margin0 = top_margins(model, held, top)
    shown_set = {tuple(p) for p in shown}
    max_len = model.cfg.max_seq_len

    with torch.no_grad():
        win = input_covariance(model, all_layers, preserve)
        sample_windows = corpus_windows(ckpt, "train", 512, preserve.shape[1], seed=SEED)
        samples = [] if args.covs == "window" else prompt_samples(tok, sample_windows, args.samples, SEED)
        covs = {"window": win}
        if samples:
            us = last_inputs(model, all_layers, samples)
            prompt = {L: (u.t() @ u / len(u)) for L, u in us.items()}
            covs |= {"prompt": prompt, "mix": {L: (win[L] + prompt[L]) / 2 for L in all_layers}}
        ridges = [float(r) for r in args.ridges.split(",")]
        counts = [int(n) for n in args.pins.split(",")]
        variants = {(f"{c}" if len(ridges) == 1 else f"{c}@{r:g}") + (f"+p{n}" if len(counts) > 1 else ""):
                    (covs[c], r, n) for c in args.covs.split(",") for r in ridges for n in counts}
        # the held-out prompts are never pinned, as the bench withholds its evaluation prompts
        pins = TextPins(pin_windows(ckpt, model), tok, [tok.decode(p) for p in held]) if max(counts) else None
        nll0 = heldout_nll(model, heldout)
    state0 = {k: v.clone() for k, v in model.splice_state().items()}
    rows = []
    for i, req in enumerate(requests):
        ex, _ = examples_of(tok, req, max_len)
        layers = layers_of.get(req.id)
        if not layers:
            continue
        neutral = [ids for p in req.neutral if tuple(ids := tok.encode(p)) in shown_set]
        row = {"id": req.id, "layers": layers}
        for name, (cov, ridge, n_pins) in variants.items():
            ctx = EditContext(preserve, neutral, pins=pins, pin_exclude=(req.prompt, *req.paraphrases))
            after = closed_form_a(model, ex, layers, ctx, EditConfig(a_ridge=ridge, text_pins=n_pins),
                                  cov={L: cov[L] for L in layers})
            model.load_splice_state(after, strict=False)
            with torch.no_grad():
                ok = greedy_hits(model, [ex])[0]
                now = greedy_continuations(model, held, 1)
                margin = top_margins(model, held, top)
                drift = heldout_nll(model, heldout) - nll0
            model.load_splice_state(state0)
            broken = [j for j, (a, b) in enumerate(zip(held_next, now, strict=True)) if a != b]
            row[name] = {"success": bool(ok), "broken": broken, "nll_drift": float(drift),
                         "margin_drop": float((margin0 - margin).clamp(min=0).mean())}
        rows.append(row)
        print(i, req.id, {k: (row[k]["success"], len(row[k]["broken"]), round(row[k]["nll_drift"], 5))
                          for k in variants}, flush=True)

    summary = {name: {"edits": len(rows),
                      "success": float(np.mean([r[name]["success"] for r in rows])),
                      "broken_per_edit": float(np.mean([len(r[name]["broken"]) for r in rows])),
                      "broken_share_per_edit": float(np.mean([len(r[name]["broken"]) for r in rows]) / len(held)),
                      "mean_nll_drift": float(np.mean([r[name]["nll_drift"] for r in rows])),
                      "mean_margin_drop": float(np.mean([r[name]["margin_drop"] for r in rows]))}
               for name in variants}
    summary["heldout_prompts"] = len(held)
    summary["samples"] = len(samples)
    summary["seconds"] = time.time() - t0
    atomic_write_text(args.out, json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
