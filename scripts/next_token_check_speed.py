"""What prompt repair's re-check costs: a listed prompt set's greedy next tokens by a whole forward pass
(`greedy_continuations(..., 1)`, the re-check before NextTokenCheck) against `NextTokenCheck`, which keeps the
stream entering the write's lowest layer and re-runs only the blocks from there and the head at the last
positions. Interleaved per round; medians; checks that every way gives the same tokens.

    python scripts/next_token_check_speed.py CHECKPOINT PROMPTS.jsonl [--starts 5 3] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from felix.model_loader import load_model
from felix.splice_data import load_prompts
from felix.splice_examples import greedy_continuations
from felix.splice_next_tokens import NextTokenCheck


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("prompts", help="preservation prompts JSONL (make-edits --source facts writes one)")
    ap.add_argument("--starts", type=int, nargs="+", default=[5, 3], help="lowest edited layers to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.checkpoint)
    prompts = [tok.encode(p) for p in load_prompts(args.prompts)]
    want = [c[0] for c in greedy_continuations(model, prompts, 1)]
    times: dict[str, list[float]] = {"whole": [], **{f"build_{s}": [] for s in args.starts},
                                     **{f"check_{s}": [] for s in args.starts}}
    for _ in range(args.repeats):
        t = time.perf_counter()
        greedy_continuations(model, prompts, 1)
        times["whole"].append(time.perf_counter() - t)
        for s in args.starts:
            t = time.perf_counter()
            check = NextTokenCheck(model, prompts, s)
            times[f"build_{s}"].append(time.perf_counter() - t)
            t = time.perf_counter()
            got = check()
            times[f"check_{s}"].append(time.perf_counter() - t)
            if got != want:
                raise SystemExit(f"start {s}: {sum(a != b for a, b in zip(got, want, strict=True))} next tokens differ")
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    print(json.dumps({"prompts": len(prompts), "threads": args.threads, "median_s": med,
                      "speedup": {s: round(med["whole"] / med[f"check_{s}"], 2) for s in args.starts}}))


if __name__ == "__main__":
    main()
