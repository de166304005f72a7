#!/usr/bin/env python
"""EXP-46y arm B: `felix splice ...` with the preservation text drawn by the mix's weights.

`preservation_windows` takes up to n windows from every source and keeps n of them at random, so a source's
share of the preservation text follows how many windows it has (capped at n), not its mix weight: on
the 16.1M facts demo (weights code 0.33, docs 0.21, tasks 0.06, facts 0.4) the 256 windows are about 30%
code, 30% docs, 13% tasks and 27% facts. This runs the CLI with each source's share of the windows set to its
mix weight instead (at least one window, at most all it has), as the held-out text already is.

    python scripts/preserve_by_weight.py splice bench --checkpoint ... (the usual arguments)
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import felix.splice_data as splice_data
from felix.cli import main
from felix.errors import FelixError


def weighted_preservation_windows(ckpt, model, n: int = splice_data.PRESERVE_WINDOWS) -> torch.Tensor:
    """About n train windows, every source's share of them its mix weight's, in random order."""
    length = min(128, model.cfg.max_seq_len)
    mix = splice_data.checkpoint_mix(ckpt)
    shards = mix.open_shards(verify=False)
    rng = np.random.default_rng(1)
    rows = []
    for name, share in mix.targets().items():
        spans = [(a, s) for a in shards[name].arrays("train") for s in range(0, len(a) - length, length)]
        k = min(len(spans), max(1, round(n * share)))
        for i in sorted(rng.choice(len(spans), size=k, replace=False).tolist()) if spans else []:
            a, s = spans[i]
            rows.append(np.asarray(a[s : s + length], dtype=np.int64))
    if not rows:
        raise FelixError(f"the data mix of {ckpt.path} has no train windows of {length} tokens")
    rng.shuffle(rows)
    return torch.from_numpy(np.stack(rows))


if __name__ == "__main__":
    splice_data.preservation_windows = weighted_preservation_windows
    sys.exit(main(sys.argv[1:]))
