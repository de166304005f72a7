#!/usr/bin/env python
"""EXP-46ah probe: does a smaller wanted change leak less into an edit's unseen neighbours?

`closed_form_a` first searches the change z of each edited layer's MLP output (in span(gate·b)) that makes
the target win by the margin: Adam at lr 2, stopped once the margin holds. Adam moves every coordinate by
about lr per step whatever its gradient, so z also grows along coordinates the target does not need; every
unit of z an edit writes reaches its neighbours by their share ρ. This probe applies each edit alone to the
unedited model (its layers as the bench chose them, its shown neutral prompts protected, today's
covariance), once with today's search and once with a minimum-norm one:

- `polyak`: on the hinge loss H(z) = Σ relu(m + ε − (target logit − best rival logit)) over the target
  positions, the step z ← z − H g / |g|² (g = ∇H), the smallest step that zeroes the linearized hinge,
  its length capped; stopped once the margin m holds. ε = 0.05 keeps a step from landing just short.

It reports each edit's |z| (the written change's norm over its positions and layers), success, the
held-out neutral prompts whose next token changed, their margin drop and the mix's held-out NLL change.

    python scripts/wanted_change_norm.py runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \
        runs/exp46ae-a/bench.json runs/exp46ah-norm.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import felix.splice_closed as splice_closed
from felix.atomic import atomic_write_text
from felix.heldout import heldout_nll
from felix.model_loader import load_model
from felix.splice_bench import neutral_pool
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import input_covariance
from felix.splice_data import examples_of, splice_texts
from felix.splice_edit import load_requests
from felix.splice_examples import (
    batch_examples,
    grads_only_for,
    greedy_continuations,
    greedy_hits,
    last_logprobs,
    model_device,
    targets_win,
)

EPS = 0.05
MAX_STEP = 50.0  # residual-stream units
POLYAK_STEPS = 200

_adam = splice_closed._wanted_changes
norms: list[float] = []


def _hinge(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    pos = labels != -100
    tgt = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    rival = logits.scatter(-1, labels.clamp(min=0)[..., None], float("-inf")).amax(-1)
    return torch.relu(margin - (tgt - rival))[pos].sum()


def polyak_changes(model, ex, layers, cfg, basis=None, positions=None):
    """`_wanted_changes` with minimum-norm (Polyak) steps on the margin hinge instead of Adam."""
    positions = positions if positions is not None else list(range(ex.n_prompt - 1, len(ex.ids) - 1))
    dev = model_device(model)
    basis = None if basis is None else {L: b.to(dev) for L, b in basis.items()}
    dims = {L: model.cfg.d_model if basis is None else basis[L].shape[1] for L in layers}
    coords = {L: torch.zeros(len(positions), dims[L], device=dev, requires_grad=True) for L in layers}
    hooks = []
    for L in layers:
        def add(_m, _args, out, L=L):
            delta = coords[L] if basis is None else coords[L] @ basis[L].t()
            out = out.clone()
            out[0, positions] = out[0, positions] + delta.to(out.dtype)
            return out
        hooks.append(model.layers[L].mlp.register_forward_hook(add))
    idx, labels, _ = batch_examples([ex], dev)
    try:
        with grads_only_for(model, []):
            for _ in range(POLYAK_STEPS):
                logits = model(idx).float()
                if targets_win(logits, labels, cfg.margin):
                    break
                h = _hinge(logits, labels, cfg.margin + EPS)
                grads = torch.autograd.grad(h, list(coords.values()))
                sq = sum(float((g * g).sum()) for g in grads)
                step = float(h) / max(sq, 1e-12)
                length = step * sq ** 0.5
                if length > MAX_STEP:
                    step *= MAX_STEP / length
                with torch.no_grad():
                    for c, g in zip(coords.values(), grads, strict=True):
                        c.sub_(step * g)
    finally:
        for hk in hooks:
            hk.remove()
    return {L: v.detach().cpu().t() for L, v in coords.items()}


def recorded(search):
    def run(model, ex, layers, cfg, basis=None, positions=None):
        z = search(model, ex, layers, cfg, basis=basis, positions=positions)
        norms.append(float(sum(float(((basis[L] @ z[L]) if basis is not None else z[L]).pow(2).sum())
                               for L in layers) ** 0.5))
        return z
    return run


@torch.no_grad()
def top_margins(model, prompts, top):
    lp = last_logprobs(model, prompts)
    own = lp.gather(1, top[:, None])[:, 0]
    return own - lp.scatter(1, top[:, None], float("-inf")).max(1).values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("bench", help="a bench.json of the same edits: each edit's layers as the bench chose them")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    t0 = time.time()

    model, tok, ckpt = load_model(args.checkpoint)
    heldout, preserve = splice_texts(ckpt, model)
    every = load_requests(args.edits)
    requests = every[: args.n]
    with open(args.bench) as f:
        layers_of = {s["id"]: s["layers"] for s in json.load(f)["steps"] if s.get("layers")}
    pool, _ = neutral_pool(model, tok, every)
    shown, held = pool[::2], pool[1::2]
    shown_set = {tuple(p) for p in shown}
    top = torch.tensor([c[0] for c in greedy_continuations(model, held, 1)])
    margin0 = top_margins(model, held, top)
    nll0 = heldout_nll(model, heldout)
    cov = input_covariance(model, sorted({L for v in layers_of.values() for L in v}), preserve)
    cfg = EditConfig()
    state0 = {k: v.clone() for k, v in model.splice_state().items()}
    searches = {"adam": _adam, "polyak": polyak_changes}
    rows = []
    for i, req in enumerate(requests):
        layers = layers_of.get(req.id)
        if not layers:
            continue
        ex, _ = examples_of(tok, req, model.cfg.max_seq_len)
        neutral = [ids for p in req.neutral if tuple(ids := tok.encode(p)) in shown_set]
        row = {"id": req.id, "layers": layers}
        for name, search in searches.items():
            norms.clear()
            splice_closed._wanted_changes = recorded(search)
            try:
                after = splice_closed.closed_form_a(model, ex, layers, EditContext(preserve, neutral), cfg,
                                                    cov={L: cov[L] for L in layers})
            finally:
                splice_closed._wanted_changes = _adam
            model.load_splice_state(after, strict=False)
            with torch.no_grad():
                ok = greedy_hits(model, [ex])[0]
                margin = top_margins(model, held, top)
                drift = heldout_nll(model, heldout) - nll0
            model.load_splice_state(state0)
            row[name] = {"success": bool(ok), "z_norm": norms[-1] if norms else 0.0, "rounds": len(norms),
                         "broken": int((margin < 0).sum()), "nll_drift": float(drift),
                         "margin_drop": float((margin0 - margin).clamp(min=0).mean())}
        rows.append(row)
        print(i, req.id, json.dumps({k: row[k] for k in searches}), flush=True)

    summary = {name: {k: float(np.mean([r[name][k] for r in rows]))
                      for k in ("success", "z_norm", "broken", "nll_drift", "margin_drop")}
               for name in searches}
    summary |= {"edits": len(rows), "heldout_prompts": len(held), "seconds": time.time() - t0}
    atomic_write_text(args.out, json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
