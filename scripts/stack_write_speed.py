"""How a patch stack's write time grows with its length (docs/benchmarks.md, "Patch stack writes").

Applies N absolute patches to a small model's stack, each with a record the size of a fact edit's, and reports
at each checkpoint length the median time of the last applies and, side by side, the time to encode the whole
stack.json at once (what every commit paid before the patches' entries were kept).

    python scripts/stack_write_speed.py [N=1000]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from felix.config import ModelConfig
from felix.model import FelixLM
from felix.patches import PatchStack

# a record the size of `felix splice apply`'s: the request with its neutral prompts, the config, the metrics
RECORD = {"request": {"prompt": "x" * 60, "target": " y", "neutral": ["n" * 40] * 6}, "method": "closed_form_a",
          "config": {f"k{i}": 0.5 for i in range(30)}, "metrics": {f"m{i}": 0.123456 for i in range(20)}}


def main(n: int) -> None:
    torch.set_num_threads(1)
    model = FelixLM(ModelConfig(vocab_size=512, n_layers=4, d_model=64, n_heads=4, d_ff=256, max_seq_len=64,
                                splice_rank=8, splice_every=2))
    stack = PatchStack.open(Path(tempfile.mkdtemp(prefix="stack-speed-")))
    name = sorted(k for k in model.splice_state() if k.endswith(".a"))[0]
    marks = sorted({m for m in (10, 100, 500, 1000, 2000, n) if m <= n})
    recent: list[float] = []
    for i in range(1, n + 1):
        t = time.perf_counter()
        stack.apply(model, {name: torch.randn_like(model.splice_state()[name])}, RECORD, absolute=True)
        recent = [*recent[-49:], time.perf_counter() - t]
        if i in marks:
            doc = json.loads((stack.dir / "stack.json").read_text())
            t = time.perf_counter()
            json.dumps(doc, indent=1, sort_keys=True)
            whole = time.perf_counter() - t
            print(f"{i:>5} patches  stack.json {(stack.dir / 'stack.json').stat().st_size / 1e6:5.2f} MB  "
                  f"apply median (last {len(recent)}) {1e3 * statistics.median(recent):6.1f} ms  "
                  f"encoding it whole {1e3 * whole:6.1f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
