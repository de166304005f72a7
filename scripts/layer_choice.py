#!/usr/bin/env python
"""EXP-46o: what one edit costs when written at each set of SpliceCore layers, alone on the checkpoint.

The edits are picked from a finished bench: its `--tail` costliest applied edits and `--control` edits
around its median cost. Each is written with the bench's method and defaults at every layer set of
`--layer-sets` (and the diagnosis's), alone on the checkpoint with its own neutral prompts protected, and
measured: success (the target greedy), the held-out perplexity increase (the mix's val text, what the
budget reads) and the increase on *selection text*, training windows outside the preservation windows,
which a rule choosing among layer sets could read without touching the text the drift is reported on.

    python scripts/layer_choice.py runs/demo-wide/run runs/wide-spec-s0.jsonl runs/exp46l-256/bench.json out.json
The write-up is docs/experiments/EXP-46o-layer-choice.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from felix.atomic import atomic_write_text
from felix.heldout import heldout_nll
from felix.model_loader import load_model
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import InputCovariances
from felix.splice_data import corpus_windows, examples_of, splice_texts
from felix.splice_diagnose import diagnose
from felix.splice_edit import METHODS, load_requests
from felix.splice_examples import greedy_hits


def picked_steps(bench: dict, tail: int, control: int) -> list[dict]:
    """The `tail` costliest applied steps and `control` steps nearest the median cost, costliest first."""
    applied = sorted((s for s in bench["steps"] if s["accepted"]), key=lambda s: -s["edit_ppl_increase"])
    mid = len(applied) // 2
    return applied[:tail] + applied[max(tail, mid - control // 2) : max(tail, mid - control // 2) + control]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("bench", help="bench.json of a finished `felix splice bench` on the same edits")
    ap.add_argument("out")
    ap.add_argument("--tail", type=int, default=10)
    ap.add_argument("--control", type=int, default=6)
    ap.add_argument("--layer-sets", default="5;3;3,5;1,3,5")
    ap.add_argument("--selection-windows", type=int, default=64)
    args = ap.parse_args()

    model, tok, ckpt = load_model(args.checkpoint)
    heldout, preserve = splice_texts(ckpt, model)
    kept = {tuple(r) for r in preserve.tolist()}
    selection = corpus_windows(ckpt, "train", 2 * args.selection_windows, preserve.shape[1], seed=2)
    selection = torch.stack([r for r in selection if tuple(r.tolist()) not in kept][: args.selection_windows])
    requests = {r.id: r for r in load_requests(args.edits)}
    cfg = EditConfig()
    method = METHODS[cfg.method]
    covariances = InputCovariances(preserve)
    state0 = model.splice_state()
    base = {"heldout": heldout_nll(model, heldout), "selection": heldout_nll(model, selection)}
    sets = [[int(x) for x in s.split(",")] for s in args.layer_sets.split(";")]
    rows = []
    for step in picked_steps(json.loads(Path(args.bench).read_text()), args.tail, args.control):
        req = requests[step["id"]]
        ex, _ = examples_of(tok, req, model.cfg.max_seq_len)
        diag = sorted(diagnose(model, tok, ex)["chosen_layers"])
        ctx = EditContext(preserve, [tok.encode(n) for n in req.neutral], [], covariances)
        row = {"id": req.id, "bench_cost": step["edit_ppl_increase"], "bench_layers": step["layers"],
               "diagnosed": diag, "arms": {}}
        for layers in [diag, *[s for s in sets if sorted(s) != diag]]:
            t0 = time.perf_counter()
            after = method(model, ex, layers, ctx, cfg)
            try:
                model.load_splice_state(after, strict=False)
                arm = {"success": greedy_hits(model, [ex])[0],
                       **{k: math.exp(heldout_nll(model, text) - base[k]) - 1.0
                          for k, text in (("heldout", heldout), ("selection", selection))}}
            finally:
                model.load_splice_state(state0)
            arm["seconds"] = time.perf_counter() - t0
            row["arms"][",".join(map(str, sorted(layers)))] = arm
            print(req.id, layers, json.dumps(arm), file=sys.stderr, flush=True)
        rows.append(row)
        atomic_write_text(args.out, json.dumps({"rows": rows, "summary": summarize(rows, args.tail)}, indent=1))


def summarize(rows: list[dict], tail: int) -> dict:
    """Per group (tail, control): mean held-out cost of the diagnosed arm, of the arm the selection text
    picks among successful arms, and of the best successful arm by held-out cost (an oracle)."""
    out = {}
    for name, group in (("tail", rows[:tail]), ("control", rows[tail:])):
        diag, picked, oracle = [], [], []
        for r in group:
            arms = r["arms"]
            d = arms[",".join(map(str, r["diagnosed"]))]
            ok = [a for a in arms.values() if a["success"]] or [d]
            diag.append(d["heldout"])
            picked.append(min(ok, key=lambda a: a["selection"])["heldout"])
            oracle.append(min(a["heldout"] for a in ok))
        if group:
            out[name] = {"edits": len(group), "diagnosed": statistics.mean(diag),
                         "picked_by_selection": statistics.mean(picked), "oracle": statistics.mean(oracle)}
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
