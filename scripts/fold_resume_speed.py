"""What a push costs a server that serves a folded stack: the fold resumed at the pushed layer
(`StackFold.served` after a fold made in the same process) against the whole fold, per SpliceCore layer,
interleaved A B A B; medians, and whether the two folds are bit for bit equal.

    python scripts/fold_resume_speed.py ARTIFACT [--repeats 3] [--threads 2] [--first-write]

With `--first-write`, each push is a server's first write after a start: the fold it resumes was read from
the store (`splices/fold.safetensors`, here a temporary one), so the residual stream entering the pushed
layer is walked up to first.

ARTIFACT is a `felix quantize` artifact in a codebook format (its `splices/` stack, if any, is applied and
its fact edits weigh the fold as a server's would). Each round pushes a fresh perturbation of one layer's
`a` (1% of its own scale, seeded), as `POST /api/v1/splice/tensor` would, so every fold is of a new stack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.splice_data import preservation_windows, stack_edits
from felix.splice_fold import StackFold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-write", action="store_true",
                    help="resume a fold read from a store (a server's first write after a start)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, ckpt = load_model(args.artifact)
    if not ckpt.quant_format:
        raise SystemExit(f"{args.artifact} is not a `felix quantize` artifact")
    stack = PatchStack.open(args.artifact)
    stack.restore(model)
    edits = stack_edits(stack, tok, model.cfg.max_seq_len)
    preserve = preservation_windows(ckpt, model)
    server = StackFold(preserve, ckpt.quant_format)  # no store: every served() folds
    gen = torch.Generator().manual_seed(0)

    def push(layer: int) -> None:
        a = model.splice_cores()[layer].a
        with torch.no_grad():
            a.add_(0.01 * a.abs().mean() * torch.randn(a.shape, generator=gen))

    layers = sorted(model.splice_cores())
    push(layers[-1])
    current = server.served(model, edits)  # the server's first fold: whole, leaves the trace a push resumes
    tmp = tempfile.TemporaryDirectory(prefix="felix-fold-")
    store = Path(tmp.name) / "fold.safetensors"
    times: dict[str, list[float]] = {f"{kind}_{L}": [] for L in layers for kind in ("resumed", "whole")}
    same, resumed_from = True, {}
    for _ in range(args.repeats):
        for layer in layers:
            if args.first_write:  # a server just started: the current stack's fold comes from the store
                server = StackFold(preserve, ckpt.quant_format, store=store)
                server.record(server.digest(model, edits), current)
                server.served(model, edits)
            push(layer)
            t0 = time.perf_counter()
            resumed = server.served(model, edits)
            times[f"resumed_{layer}"].append(time.perf_counter() - t0)
            resumed_from[layer] = server.resumed_from
            t0 = time.perf_counter()
            whole = StackFold(preserve, ckpt.quant_format).served(model, edits)
            times[f"whole_{layer}"].append(time.perf_counter() - t0)
            same &= resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
            current = whole
    tmp.cleanup()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "splice_layers": layers,
                      "n_layers": model.cfg.n_layers, "fact_edits": len(edits), "threads": args.threads,
                      "first_write": args.first_write,
                      "preserve_tokens": preserve.numel(), "resumed_from": resumed_from,
                      "median_seconds": med,
                      "ratio_whole_to_resumed": {L: med[f"whole_{L}"] / med[f"resumed_{L}"] for L in layers},
                      "folds_bit_identical": same, "times": times}))


if __name__ == "__main__":
    main()
