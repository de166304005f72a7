#!/usr/bin/env python
"""EXP-46w: is an entity-fact edit keyed at the subject's last token more specific than one keyed at the
prompt's last token?

Each edit of an entity-fact set (`make-edits --source facts`) is applied alone to the unedited checkpoint
by three arms, all `closed_form_a`'s least-energy update of `a` with the request's neutral prompts protected:
- `last_L1`: the package's `closed_form_a` at layer 1 (keys at the target-predicting positions);
- `last_L13`: the same at layers 1 and 3 (the diagnosis's usual choice);
- `subject_last_L1`: at layer 1, the wanted change added to the MLP output at the subject's last token (ROME's
  key position) and searched through the rest of the model; the key is u there, and the neutral prompts'
  keys at their own subjects' last tokens are protected;
- `subject_span_L1`: the same at every token of the subject (one change and one key per token).

Per edit and arm: success, paraphrase success (the fact's other templates), the share of the model's held
facts still held (same relation: the neighbours; other relations), and the held-out perplexity cost.

    python scripts/subject_keys.py runs/demo-facts/run runs/facts-s0.jsonl 40 out.json

The write-up is docs/experiments/EXP-46w-subject-keys.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from felix.atomic import atomic_write_text
from felix.facts import TEMPLATES, stdlib_facts
from felix.heldout import heldout_nll
from felix.model_loader import load_model
from felix.splice_closed import _wanted_changes, closed_form_a, solve_a_update
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import down_inputs, input_covariance
from felix.splice_data import heldout_text, preservation_windows
from felix.splice_edit import load_requests
from felix.splice_examples import greedy_hits, make_example
from felix.splice_facts import held_prompts

LAYER = 1
ARMS = ("last_L1", "last_L13", "subject_last_L1", "subject_span_L1")


def subject_positions(tok, prompt: str, subject: str, span: bool) -> list[int] | None:
    """Indices of the subject's tokens in the prompt's ids (the last one alone unless `span`); None when the
    tokenization does not split at the subject's ends."""
    if subject not in prompt:
        return None
    start = prompt.rfind(subject)
    # a space before the subject is part of its first token (" TypeError"), so the head stops short of it
    head = tok.encode(prompt[:start].removesuffix(" "))
    ids, tail = tok.encode(prompt), tok.encode(prompt[: start + len(subject)])
    if ids[: len(tail)] != tail or tail[: len(head)] != head:
        return None
    return list(range(len(head), len(tail))) if span else [len(tail) - 1]


def subject_keys(model, tok, prompts: list[tuple[str, str]], layer: int, span: bool) -> torch.Tensor:
    """u at each (prompt, subject)'s subject positions: (d_ff, n)."""
    cols = []
    for prompt, subject in prompts:
        pos = subject_positions(tok, prompt, subject, span)
        if pos:
            idx = torch.tensor([tok.encode(prompt)])
            cols.append(down_inputs(model, [layer], idx)[layer][0, pos].t())
    return torch.cat(cols, 1) if cols else torch.zeros(model.cfg.d_ff, 0)


def subject_edit(model, tok, ex, subject_prompt: tuple[str, str], neutral: list[tuple[str, str]], cov, cfg,
                 span: bool):
    """closed_form_a's update of layer LAYER's `a`, keyed at the subject's last token (or all its tokens)."""
    core = model.splice_cores()[LAYER]
    pos = subject_positions(tok, *subject_prompt, span)
    before = core.a.detach().clone()
    try:
        for _ in range(cfg.rounds):
            if greedy_hits(model, [ex])[0]:
                break
            gb = (core.gate * core.b).detach().float().cpu()
            basis = torch.linalg.qr(gb).Q
            z = _wanted_changes(model, ex, [LAYER], cfg, basis={LAYER: basis}, positions=pos)[LAYER]
            codes = torch.linalg.lstsq(gb, basis @ z).solution
            k1 = subject_keys(model, tok, [subject_prompt], LAYER, span)
            kp = subject_keys(model, tok, neutral, LAYER, span)
            da = solve_a_update(codes, k1, kp, cov[LAYER], cfg.a_ridge)
            with torch.no_grad():
                core.a.add_(da.to(core.a.dtype))
        return {f"layers.{LAYER}.mlp.splice.a": core.a.detach().clone()}
    finally:
        with torch.no_grad():
            core.a.copy_(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run or checkpoint directory of an entity-facts demo")
    ap.add_argument("edits", help="edit set from `felix splice make-edits --source facts`")
    ap.add_argument("n", type=int, help="edits to measure (the first n)")
    ap.add_argument("out", help="JSON file to write")
    args = ap.parse_args()
    ckpt_path, edits_path, n, out = args.checkpoint, args.edits, args.n, args.out
    model, tok, ckpt = load_model(ckpt_path)
    model.eval()
    max_len = model.cfg.max_seq_len
    facts = stdlib_facts()
    by_prompt = {f.prompt(t)[0]: f for f in facts for t in TEMPLATES[f.relation]}
    held = held_prompts(model, tok, facts)
    held_ex = {f: [make_example(tok, *f.prompt(t), max_len) for t in ts] for f, ts in held.items()}
    text = heldout_text(ckpt, 128, 128)
    nll0 = heldout_nll(model, text)
    preserve = preservation_windows(ckpt, model)
    cov = input_covariance(model, [1, 3], preserve)
    state0 = model.splice_state()
    cfg = EditConfig()
    rows = []
    for req in load_requests(edits_path)[:n]:
        fact = by_prompt[req.prompt]
        ex = make_example(tok, req.prompt, req.target, max_len)
        paras = [make_example(tok, p, req.target, max_len) for p in req.paraphrases]
        neutral_ids = [tok.encode(p) for p in req.neutral]
        neutral_subj = [(p, by_prompt[p].subject) for p in req.neutral]
        ctx = EditContext(preserve=preserve, neutral=neutral_ids)
        row = {"id": req.id, "subject_tokens": subject_positions(tok, req.prompt, fact.subject, span=True)}
        for arm in ARMS:
            t0 = time.perf_counter()
            if arm.startswith("subject"):
                if not row["subject_tokens"]:
                    continue
                new = subject_edit(model, tok, ex, (req.prompt, fact.subject), neutral_subj, cov, cfg,
                                   span=arm == "subject_span_L1")
            else:
                layers = [1] if arm == "last_L1" else [1, 3]
                new = closed_form_a(model, ex, layers, ctx, cfg, cov={L: cov[L] for L in layers})
            model.load_splice_state(new, strict=False)
            with torch.no_grad():
                near = [f for f in held if f.relation == fact.relation and f != fact]
                far = [f for f in held if f.relation != fact.relation]
                kept = {f: all(greedy_hits(model, held_ex[f])) for f in near + far}
                cost = math.exp(heldout_nll(model, text) - nll0) - 1
            row[arm] = {"success": greedy_hits(model, [ex])[0],
                        "paraphrase": sum(greedy_hits(model, paras)) / len(paras),
                        "neighbours_kept": sum(kept[f] for f in near) / max(1, len(near)),
                        "others_kept": sum(kept[f] for f in far) / max(1, len(far)),
                        "cost": cost, "seconds": time.perf_counter() - t0}
            model.load_splice_state(state0)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    summary = {}
    for arm in ARMS:
        rs = [r[arm] for r in rows if arm in r]
        ok = [r for r in rs if r["success"]]
        summary[arm] = {"edits": len(rs), "success": sum(r["success"] for r in rs) / len(rs),
                        **{k: statistics.mean(r[k] for r in ok) if ok else None
                           for k in ("paraphrase", "neighbours_kept", "others_kept", "cost")},
                        "median_cost": statistics.median(r["cost"] for r in ok) if ok else None}
    both = [r for r in rows if "subject_span_L1" in r and r["subject_span_L1"]["success"] and r["last_L1"]["success"]]
    summary["paired"] = {"edits": len(both), **{f"{arm}_{k}": statistics.mean(r[arm][k] for r in both) if both else None
                                                for arm in ("last_L1", "subject_span_L1")
                                                for k in ("paraphrase", "neighbours_kept", "others_kept", "cost")}}
    print(json.dumps(summary, indent=1))
    atomic_write_text(out, json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
