"""Greedy continuations one prompt at a time (KV-cached `generate`) against `greedy_continuations`
(batched), on a checkpoint and a prompts file (JSONL with a "prompt" field), median of `--repeats`.

    python scripts/greedy_speed.py runs/demo-facts-w512/run runs/facts-w512-s0.preserve.jsonl --n 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from felix.generate import generate
from felix.model_loader import load_model
from felix.splice_examples import greedy_continuations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("prompts")
    ap.add_argument("--n", type=int, default=256, help="prompts used (the file's first N)")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok, _ = load_model(args.checkpoint)
    model.eval()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [tok.encode(json.loads(line)["prompt"]) for line in f if line.strip()][: args.n]
    ways = {"one_at_a_time": lambda: [tuple(generate(model, p, args.tokens, greedy=True)) for p in prompts],
            "batched": lambda: greedy_continuations(model, prompts, args.tokens)}
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    outs = {}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        for name, fn in ways.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({"prompts": len(prompts), "tokens": args.tokens, "threads": torch.get_num_threads(),
                      **{f"{k}_s": v for k, v in med.items()}, "ratio": med["one_at_a_time"] / med["batched"],
                      "identical": sum(a == b for a, b in zip(outs["one_at_a_time"], outs["batched"], strict=True))}))


if __name__ == "__main__":
    main()
