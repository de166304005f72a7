#!/usr/bin/env python
"""Which edit broke which neutral prompt: replay a kept patch stack and attribute each locality loss.

Needs a stack kept by the bench (`felix splice bench ... --keep-patches DIR`). The patches are replayed
in order; after each, every neutral prompt of the bench's pool is checked for its 4-token greedy
continuation (the bench's `locality`) and its next token alone. For each prompt the first edit that
changed it is recorded, with whether that edit's prompt ends in the same token, and the same two tokens
(the same local pattern: `(unittest.`, `os.path.`). Each edit gets its n-gram habit share: how often its original
(held) next token follows the prompt's last one and last two tokens in the training text.

    python scripts/locality_attribution.py runs/demo-wide/run runs/wide-spec-s0.jsonl runs/exp46g-rep/stack out.json
The findings are in docs/splicing.md ("Where locality goes").
"""

from __future__ import annotations

import json

from kept_stack import kept_stack_args

from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.splice_bench import neutral_pool, next_token_examples
from felix.splice_data import NextTokenShares
from felix.splice_edit import load_requests
from felix.splice_examples import greedy_continuations, greedy_hits, kl_rows, last_logprobs


def main() -> None:
    args = kept_stack_args(__doc__)

    model, tok, ckpt = load_model(args.checkpoint)
    requests = load_requests(args.edits)[: args.n]
    pool, neutral = neutral_pool(model, tok, requests)
    nxt = next_token_examples(neutral)
    lp0 = last_logprobs(model, pool)
    top2 = lp0.topk(2, dim=-1).values
    prompts = {r.id: tok.encode(r.prompt) for r in requests}
    held = dict(zip(prompts, (c[0] for c in greedy_continuations(model, list(prompts.values()), 1)), strict=True))
    shares = {k: NextTokenShares.of_checkpoint(ckpt, model.cfg.vocab_size, context=k) for k in (1, 2)}

    stack = PatchStack.open(args.stack)
    first: dict[int, str] = {}
    first_next: dict[int, str] = {}
    for p in stack.list():
        state = model.splice_state()
        state.update(p.after)
        model.load_splice_state(state)
        rid = p.record["request"].get("id")
        for j, ok in enumerate(greedy_hits(model, neutral)):
            if not ok:
                first.setdefault(j, rid)
        for j, ok in enumerate(greedy_hits(model, nxt)):
            if not ok:
                first_next.setdefault(j, rid)
    kept, kept_next = greedy_hits(model, neutral), greedy_hits(model, nxt)
    kl = kl_rows(lp0, last_logprobs(model, pool))

    def same_pattern(j: int, rid: str | None, k: int) -> bool | None:
        return None if rid is None else prompts[rid][-k:] == pool[j][-k:]

    rows = [{"prompt": tok.decode(pool[j]).split("\n")[-1][-50:], "continuation": tok.decode(list(neutral[j].target)),
             "margin0": float(top2[j, 0] - top2[j, 1]), "kl_final": float(kl[j]),
             "kept": kept[j], "kept_next_token": kept_next[j],
             "first_changed_by": first.get(j), "next_token_first_changed_by": first_next.get(j),
             "next_token_breaker_same_last_token": same_pattern(j, first_next.get(j), 1),
             "next_token_breaker_same_pattern": same_pattern(j, first_next.get(j), 2)} for j in range(len(pool))]
    applied = {p.record["request"].get("id") for p in stack.list()}
    edits = []
    for r in requests:
        s1, s2 = (shares[k].share(prompts[r.id], held[r.id]) for k in (1, 2))
        n2 = shares[2].context_count(prompts[r.id])
        edits.append({"id": r.id, "applied": r.id in applied, "prompt": r.prompt.split("\n")[-1][-50:],
                      "held": tok.decode([held[r.id]]), "target": r.target, "share_1": s1, "share_2": s2,
                      "context_2_count": n2})
    breaks = [r for r in rows if r["next_token_first_changed_by"] is not None]
    summary = {"neutral": len(rows), "kept_final": sum(kept), "kept_next_token_final": sum(kept_next),
               "never_changed": sum(r["first_changed_by"] is None for r in rows),
               "next_token_never_changed": len(rows) - len(breaks),
               "next_token_breaks_by_same_last_token_edit":
                   sum(bool(r["next_token_breaker_same_last_token"]) for r in breaks),
               "next_token_breaks_by_same_pattern_edit":
                   sum(bool(r["next_token_breaker_same_pattern"]) for r in breaks),
               "edits_share_2_at_least_0.05": sum(e["share_2"] >= 0.05 for e in edits),
               "edits_share_2_at_least_0.2": sum(e["share_2"] >= 0.2 for e in edits), "edits": len(edits)}
    print(json.dumps(summary))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "neutral": rows, "edits": edits}, f, indent=1)


if __name__ == "__main__":
    main()
