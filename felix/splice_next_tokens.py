"""The greedy next tokens of a fixed prompt set, re-read after each write to SpliceCore layers at or above
one block: what prompt repair checks after every attempt of a write.

The residual stream entering block `start` does not depend on the SpliceCores of `start` or above, so it is
computed once and each re-read runs only blocks `start`.. and the head, and the head only at each prompt's
last position. A fact edit writes the top SpliceCore layer in most cases (84 of 100 in EXP-46aq), where a
re-read runs one block of six instead of all six and the head at one position instead of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from felix.model import FelixLM
from felix.splice_examples import Example, batch_examples, model_device


class NextTokenCheck:
    """Greedy next tokens of `prompts` on the model as it is at each call, for writes at blocks >= `start`.

    Prompts are batched `chunk` at a time in order of length (little right padding; causal attention
    keeps a row's last position blind to its padding). Memory: one d_model residual per prompt token.
    A write below `start` goes unseen: the kept streams are those of the model at construction.
    """

    def __init__(self, model: FelixLM, prompts: Sequence[Sequence[int]], start: int, chunk: int = 64):
        if not 0 <= start < model.cfg.n_layers:
            raise ValueError(f"start block {start} is outside the model's {model.cfg.n_layers} blocks")
        limit = model.cfg.max_seq_len
        for p in prompts:
            if not p or len(p) > limit:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit max_seq_len {limit}")
        self.model, self.start, self.n = model, start, len(prompts)
        self.order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (stream entering `start`, last positions)
        with torch.no_grad():
            for s in range(0, len(prompts), chunk):
                rows = [Example(tuple(prompts[i]), len(prompts[i])) for i in self.order[s : s + chunk]]
                idx, _, lengths = batch_examples(rows, model_device(model))
                x = model.residual_through(idx, start - 1)  # start 0: the embeddings
                self.chunks.append((x, (lengths - 1).to(x.device)))

    @torch.no_grad()
    def read(self, tokens: Sequence[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """Each prompt's greedy next token, in the prompts' order, and the lead (logits, so log-probabilities
        too) of `tokens[i]` over the best other token: how far the prompt is from changing its answer away
        from `tokens[i]` (negative: another token wins). Without `tokens`, the lead of the greedy token."""
        model, out, leads = self.model, [0] * self.n, torch.empty(self.n)
        done = 0
        for x, last in self.chunks:
            cos, sin = model.rope_cos[: x.shape[1]], model.rope_sin[: x.shape[1]]
            for block in model.layers[self.start :]:
                x = block(x, cos, sin)
            ids = self.order[done : done + len(last)]
            done += len(last)
            logits = model.lm_head(model.norm(x[torch.arange(x.shape[0], device=x.device), last])).float()
            top = logits.argmax(-1)
            for i, t in zip(ids, top.tolist(), strict=True):
                out[i] = int(t)
            own = top[:, None] if tokens is None else torch.tensor([tokens[i] for i in ids], device=x.device)[:, None]
            rival = logits.scatter(-1, own, float("-inf")).amax(-1)
            leads[ids] = (logits.gather(-1, own).squeeze(-1) - rival).cpu()
        return out, leads

    def __call__(self) -> list[int]:
        """Each prompt's greedy next token, in the prompts' order."""
        return self.read()[0]
