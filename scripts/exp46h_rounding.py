#!/usr/bin/env python
"""EXP-46h: edit retention after rounding a kept 100-edit stack's SpliceCore through RQ4, plain vs GPTQ.

Needs a stack kept by the bench (`felix splice bench ... --n 100 --keep-patches DIR`). Each arm starts
from the stack's final SpliceCore state and is measured with the bench's own rates (all requests'
targets, paraphrases, the neutral pool's 4-token continuations of the unspliced model) and the held-out
drift against the unspliced fp32 model. The `full_rq4_*` arms round every weight as `felix quantize` does;
`merged_rq4_plain` as `felix export gguf --dtype rq4` does (SpliceCore merged into ffn_down first).

    python scripts/exp46h_rounding.py runs/demo-wide/run runs/wide-spec-s0.jsonl runs/exp46g-rep/stack out.json
The write-up is docs/experiments/EXP-46h-gptq-rounding.md.
"""

from __future__ import annotations

import json
import sys
import time

from kept_stack import KeptStack, kept_stack_args

from felix.quantize import fake_quantize_model
from felix.splice_quant import gptq_requantizer, requantizer


def main() -> None:
    args = kept_stack_args(__doc__)

    kept = KeptStack(args)
    model, preserve, applied, spliced, state0 = kept.model, kept.preserve, kept.applied, kept.spliced, kept.state0
    results: dict[str, dict] = {}

    def measure(name: str, m, seconds: float = 0.0) -> None:
        results[name] = kept.measure(m) | {"round_seconds": seconds}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)

    arms = {"fp32": None, "plain": requantizer()}
    arms |= {f"gptq_s{s}": gptq_requantizer(preserve, applied, edit_share=s) for s in (0.0, 0.5, 0.9)}
    for name, rounding in arms.items():
        model.load_splice_state(spliced)
        t0 = time.perf_counter()
        if rounding is not None:
            rounding(model)
        measure(name, model, time.perf_counter() - t0)
    model.load_splice_state(state0)
    measure("full_rq4_unspliced", fake_quantize_model(model, "rq4"))
    model.load_splice_state(spliced)
    full = fake_quantize_model(model, "rq4")
    measure("full_rq4_plain", full)
    full.load_splice_state(spliced)
    gptq_requantizer(preserve, applied, edit_share=0.5)(full)
    measure("full_rq4_gptq_s0.5", full)
    # `felix export gguf --dtype rq4` (no adapter): SpliceCore merged into ffn_down, the sum rounded plainly
    model.load_splice_state(spliced)
    for core, layer in ((c, model.layers[L]) for L, c in model.splice_cores().items()):
        layer.mlp.down_proj.weight.add_(core.delta_weight().to(layer.mlp.down_proj.weight.dtype))
        core.b.zero_()
    measure("merged_rq4_plain", fake_quantize_model(model, "rq4"))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"applied": len(applied), "arms": results}, f, indent=1)


if __name__ == "__main__":
    main()
