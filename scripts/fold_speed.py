"""What serving an edited RQ4 artifact costs: its stack's fold with a fresh covariance pass per layer (how
`gptq_requantizer` worked until 2026-12-02) against the bottom-up pass (`BottomUpCovariances`), interleaved
A B A B, and `load_model(..., splices=True)` with the stored fold against one that must fold; medians.

    python scripts/fold_speed.py ARTIFACT [--repeats 3] [--threads 2]

ARTIFACT is a `felix quantize` artifact whose `splices/` holds unrounded edits (`felix splice apply` on it).
The stored fold (`splices/fold.safetensors`) is moved aside for the cold loads and put back at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from felix.model_loader import load_model
from felix.patch_format import FOLD_FILE, SPLICES_DIR
from felix.patches import PatchStack
from felix.splice_covariance import input_covariance, inputs_at_targets
from felix.splice_data import preservation_windows, stack_edits
from felix.splice_quant import _gptq_or_plain, edit_weighted_covariance, gptq_requantizer


def per_layer_fold(model, preserve, edits, fmt="rq4", edit_share=0.5, damp=0.01) -> None:
    """The fold as it was: each layer's covariance from a fresh pass through every block below it."""
    cores = model.splice_cores()
    for layer in sorted(cores):
        core, name = cores[layer], f"layers.{layer}.mlp.splice."
        h = edit_weighted_covariance(input_covariance(model, [layer], preserve)[layer],
                                     inputs_at_targets(model, [layer], list(edits))[layer], edit_share)
        a, b = core.a.detach().double().cpu(), core.b.detach().double().cpu()
        a_q = _gptq_or_plain(name + "a", a, h, fmt, damp).double()
        cross, own = a @ h @ a_q.t(), a_q @ h @ a_q.t()
        ridge = 1e-9 * float(own.trace()) * torch.eye(own.shape[0], dtype=torch.float64)
        b_fit = torch.linalg.solve(own + ridge, (b @ cross).t()).t()
        b_q = _gptq_or_plain(name + "b", b_fit, own, fmt, damp)
        with torch.no_grad():
            core.a.copy_(a_q.to(core.a.dtype))
            core.b.copy_(b_q.to(core.b.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, ckpt = load_model(args.artifact)
    stack = PatchStack.open(args.artifact)
    stack.restore(model)
    unrounded = model.splice_state()
    edits = stack_edits(stack, tok, model.cfg.max_seq_len)
    preserve = preservation_windows(ckpt, model)

    times: dict[str, list[float]] = {"per_layer": [], "bottom_up": [], "load_stored": [], "load_folding": []}
    folds = {}
    store = args.artifact / SPLICES_DIR / FOLD_FILE
    aside = store.with_suffix(".aside")
    if not store.is_file():
        load_model(args.artifact, splices=True)  # folds and stores
    for _ in range(args.repeats):
        for name, fold in (("per_layer", lambda m: per_layer_fold(m, preserve, edits)),
                           ("bottom_up", gptq_requantizer(preserve, edits))):
            model.load_splice_state(unrounded)
            t0 = time.perf_counter()
            fold(model)
            times[name].append(time.perf_counter() - t0)
            folds[name] = model.splice_state()
        t0 = time.perf_counter()
        stored, _, _ = load_model(args.artifact, splices=True)
        times["load_stored"].append(time.perf_counter() - t0)
        shutil.move(store, aside)
        try:
            t0 = time.perf_counter()
            folding, _, _ = load_model(args.artifact, splices=True)
            times["load_folding"].append(time.perf_counter() - t0)
        finally:
            shutil.move(aside, store)
        assert all(torch.equal(stored.splice_state()[k], v) for k, v in folding.splice_state().items())
    same = all(torch.equal(folds["per_layer"][k], v) for k, v in folds["bottom_up"].items())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"patches": len(stack), "fact_edits": len(edits), "threads": args.threads,
                      "median_seconds": med, "fold_ratio": med["per_layer"] / med["bottom_up"],
                      "load_ratio": med["load_folding"] / med["load_stored"], "folds_bit_identical": same,
                      "times": times}))


if __name__ == "__main__":
    main()
