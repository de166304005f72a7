#!/usr/bin/env python
"""EXP-46p: how much locality an untargeted change of the same drift costs.

Gaussian noise is added to one SpliceCore layer's `a` (per row, scaled to the row's norm), its size found
by bisection so that the mix's held-out perplexity rises by each target drift. At each point the bench's
locality is measured on an edit set's neutral pool: the share of prompts whose greedy 4-token
continuation, and whose next token, are unchanged. Locality at a given drift is then comparable with a
bench's: an edit sequence that keeps fewer neutral continuations than noise of its own drift breaks them
by aiming at them, one that keeps as many loses them to drift alone.

    python scripts/locality_noise.py runs/demo-wide/run runs/wide-spec-s0.jsonl out.json
The write-up is docs/experiments/EXP-46p-locality-noise.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from felix.atomic import atomic_write_text
from felix.heldout import heldout_nll
from felix.model_loader import load_model
from felix.splice_bench import _locality, neutral_pool
from felix.splice_data import splice_texts
from felix.splice_edit import load_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=100, help="requests whose neutral prompts make the pool")
    ap.add_argument("--layer", type=int, help="SpliceCore layer to perturb (default: the last)")
    ap.add_argument("--drifts", default="0.005,0.01,0.02,0.034,0.1")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    model, tok, ckpt = load_model(args.checkpoint)
    heldout, _ = splice_texts(ckpt, model)
    _, neutral = neutral_pool(model, tok, load_requests(args.edits)[: args.n])
    layer = args.layer if args.layer is not None else max(model.splice_cores())
    a = model.splice_cores()[layer].a
    a0 = a.detach().clone()
    nll0 = heldout_nll(model, heldout)

    def drift_at(scale: float, noise: torch.Tensor) -> float:
        a.copy_(a0 + scale * noise)
        return math.exp(heldout_nll(model, heldout) - nll0) - 1.0

    rows = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(a0.shape, generator=g)
        noise *= a0.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)  # each row as long as a's
        for target in (float(x) for x in args.drifts.split(",")):
            lo, hi = 0.0, 1.0
            while drift_at(hi, noise) < target:
                lo, hi = hi, 2 * hi
            for _ in range(8):  # bisection on the noise scale; drift rises with it
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if drift_at(mid, noise) < target else (lo, mid)
            drift = drift_at(hi, noise)
            row = {"seed": seed, "target_drift": target, "drift": drift, "scale": hi, **_locality(model, neutral)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        a.copy_(a0)
    atomic_write_text(args.out, json.dumps({"checkpoint": str(ckpt.path), "layer": layer,
                                            "neutral_prompts": len(neutral), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
