"""closed_form_a's input covariance: one full forward over all preservation windows (how it was computed
until 2026-12-02) against `input_covariance` (chunks of windows, blocks only up to the last layer asked
for), interleaved A B A B on one thread; medians and their ratio.

    python scripts/covariance_speed.py runs/demo-wide/run [--windows 256] [--repeats 3]
    python scripts/covariance_speed.py runs/demo-wide/run --memory {full,chunked}  # peak RSS growth, once
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from felix.model_loader import load_model
from felix.splice_covariance import input_covariance
from felix.splice_data import splice_texts


def full_forward_covariance(model, layers: list[int], preserve: torch.Tensor) -> dict[int, torch.Tensor]:
    us: dict[int, torch.Tensor] = {}
    hooks = [model.layers[L].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, L=L: us.__setitem__(L, args[0].detach().float())) for L in layers]
    try:
        with torch.no_grad():
            model(preserve)
    finally:
        for h in hooks:
            h.remove()
    return {L: u.flatten(0, 1).t() @ u.flatten(0, 1) / u[..., 0].numel() for L, u in us.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", choices=["full", "chunked"], help="run one method once and print its peak")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _, ckpt = load_model(args.checkpoint, splices=True)
    _, preserve = splice_texts(ckpt, model, args.windows)
    layers = sorted(model.splice_cores())
    if args.memory:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (full_forward_covariance if args.memory == "full" else input_covariance)(model, layers, preserve)
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(f"{args.memory}, {args.windows} windows, layers {layers}: peak RSS growth {growth:.0f} MiB")
        return
    for subset in ([layers[-1]], layers):
        times: dict[str, list[float]] = {"full": [], "chunked": []}
        for _ in range(args.repeats):
            for name, fn in (("full", full_forward_covariance), ("chunked", input_covariance)):
                t0 = time.perf_counter()
                fn(model, subset, preserve)
                times[name].append(time.perf_counter() - t0)
        a, b = full_forward_covariance(model, subset, preserve), input_covariance(model, subset, preserve)
        diff = max(float((a[L] - b[L]).abs().max() / a[L].abs().max()) for L in subset)
        full, chunked = statistics.median(times["full"]), statistics.median(times["chunked"])
        print(f"layers {subset}: full forward {full:.2f} s, chunked {chunked:.2f} s, {full / chunked:.2f}x; "
              f"max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
