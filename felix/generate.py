"""Autoregressive sampling with a KV cache: greedy, temperature and top-k."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from felix.model import FelixLM, KVCache


@torch.no_grad()
def stream_tokens(
    model: FelixLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    stop_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; the prompt is prefilled once, then one token per step."""
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    limit = model.cfg.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_seq_len {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    device = model.tok_emb.weight.device
    cache = KVCache(model.cfg, 1, len(prompt_ids) + max_new_tokens, device, model.tok_emb.weight.dtype)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]
    for _ in range(max_new_tokens):
        if greedy or temperature <= 0:
            nxt = int(logits.argmax())
        else:
            scaled = logits.float() / temperature
            if top_k:
                kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))
        yield nxt
        if nxt in stop_ids:
            return
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]


def generate(model: FelixLM, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All new token ids (the stop token included when one ends the sample)."""
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **kwargs))
