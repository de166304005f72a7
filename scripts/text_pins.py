#!/usr/bin/env python
"""EXP-46ac: pin each edit's nearest neighbours by key, found in the training text (no fact table).

`build`: from an edit set and the neutral pool its bench used with `--heldout-neutral`, write the same
edits whose neutral prompts (each protected exactly by its edit, as `closed_form_a` protects a request's
neutral prompts) are the shown half of the old ones plus `--pins` prompts cut from training text: the
positions whose down-projection input u at layer `--layer` gets the largest share of a least-C-energy write
at the edit's key, ρ(s) = uₛᵀ C⁻¹ uₑ / uₑᵀ C⁻¹ uₑ (C: closed_form_a's, over the preservation windows, with
its ridge). A pin is the position's line behind up to 3 lines of its context. Positions whose line is the
line of any edit's prompt or paraphrase, or of any prompt of the old pool, are skipped, so the old held-out
half stays unseen by every edit and no pin restates an edited fact.

Measure with `scripts/relation_pins.py measure` (the old held-out half, side by side).

    python scripts/text_pins.py build runs/demo-facts-wide4/run runs/facts-wide4-s0.jsonl \\
        runs/facts-wide4-textpins8.jsonl --pins 8
"""

from __future__ import annotations

import argparse
import json

import torch
from relation_pins import heldout_half  # scripts/, beside this one

from felix.model_loader import load_model
from felix.splice_config import EditConfig
from felix.splice_covariance import COVARIANCE_CHUNK, down_inputs, input_covariance, inputs_at_targets
from felix.splice_data import corpus_windows, examples_of, preservation_windows
from felix.splice_edit import load_requests, save_requests


def last_line(text: str) -> str:
    return text.rsplit("\n", 1)[-1].strip()


@torch.no_grad()
def build(args) -> None:
    model, tok, ckpt = load_model(args.checkpoint)
    requests = load_requests(args.edits)[: args.n]
    shown, hidden = heldout_half(model, tok, requests)
    banned = {last_line(p) for p in shown + hidden}
    banned |= {last_line(p) for r in requests for p in [r.prompt, *r.paraphrases]}
    layer = args.layer
    cov = input_covariance(model, [layer], preservation_windows(ckpt, model))[layer].double()
    d_ff = cov.shape[0]
    cov = cov + EditConfig().a_ridge * float(cov.trace()) / d_ff * torch.eye(d_ff, dtype=torch.float64)
    # the key at the position predicting the first target token
    keys = torch.stack([inputs_at_targets(model, [layer], [examples_of(tok, r, model.cfg.max_seq_len)[0]])[layer][:, 0]
                        for r in requests], dim=1).double()  # (d_ff, edits)
    w = torch.linalg.solve(cov, keys)
    w = (w / (keys * w).sum(0, keepdim=True)).float()  # ρ(s) = uₛ · w[:, e]
    text = corpus_windows(ckpt, "train", args.windows, 128, seed=args.seed)
    rho = torch.cat([down_inputs(model, [layer], chunk)[layer].flatten(0, 1) @ w
                     for chunk in text.split(COVARIANCE_CHUNK)])  # (positions, edits)
    out, ranks = [], []
    for e, r in enumerate(requests):
        pins: list[str] = []
        lines: set[str] = set()
        for s in rho[:, e].argsort(descending=True).tolist():
            row, col = divmod(s, text.shape[1])
            context = tok.decode(text[row, : col + 1].tolist())
            line = last_line(context)
            if not line or line in banned or line in lines:
                continue
            lines.add(line)
            pins.append("\n".join(context.split("\n")[-4:]))
            ranks.append(float(rho[s, e]))
            if len(pins) == args.pins:
                break
        out.append(type(r)(r.prompt, r.target, r.paraphrases, [p for p in r.neutral if p in set(shown)] + pins,
                           id=r.id))
    save_requests(args.out, out)
    ranks_t = torch.tensor(ranks)
    print(json.dumps({"edits": len(out), "shown": len(shown), "held_out": len(hidden), "layer": layer,
                      "text_positions": text.numel(), "pins_per_edit": args.pins,
                      "pin_rho_median": float(ranks_t.median()), "pin_rho_min": float(ranks_t.min())}))
    for r in out[:3]:
        print(json.dumps({"prompt": r.prompt[-60:], "pins": [p.rsplit("\n", 1)[-1] for p in r.neutral]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=["build"])
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("out")
    ap.add_argument("--pins", type=int, default=8)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--windows", type=int, default=512, help="training windows (128 tokens) searched for pins")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n", type=int, default=100)
    build(ap.parse_args())


if __name__ == "__main__":
    main()
