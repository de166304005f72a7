"""Autoregressive sampling with a KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from felix.model import FelixLM, KVCache


def check_sampling(temperature: float, top_k: int | None, top_p: float, greedy: bool,
                   name: Callable[[str], str] = str) -> None:
    """ValueError for sampling settings that cannot sample; `name` spells each setting (a CLI passes flags)."""
    if not greedy and not temperature >= 0:  # also refuses NaN, which would poison the softmax
        raise ValueError(f"{name('temperature')} must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"{name('top_k')} must be >= 0 (0: no top-k cut), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p}")


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 `logits / temperature` (temperature > 0) shifted to a max of 0, ready for a softmax."""
    # Shifted first: a tiny temperature then gives 0 and -inf, not inf (softmax: NaN). Floored at float32's
    # smallest normal: a positive temperature that is 0 in float32 (1e-50) would give 0/0 = NaN at the max.
    logits = logits.float()
    return (logits - logits.max()) / max(temperature, torch.finfo(torch.float32).tiny)


def stream_tokens(
    model: FelixLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    stop_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    top_p: float = 1.0,
) -> Iterator[int]:
    """Yield new token ids one at a time; the prompt is prefilled once, then one token per step.

    At most max_seq_len - len(prompt_ids) tokens come (the context never slides). Temperature 0 is greedy;
    `top_p` < 1 samples from the smallest set of tokens whose probability reaches it (after the top-k cut). Bad
    arguments raise ValueError here, on the call, not on the first `next()`, so a caller can report them before
    it writes anything.
    """
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    limit = model.cfg.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_seq_len {limit}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, greedy)
    return _stream(model, prompt_ids, min(max_new_tokens, limit - len(prompt_ids)), temperature, top_k, top_p,
                   greedy or temperature == 0, stop_ids, generator)


@torch.no_grad()
def _stream(model: FelixLM, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float, greedy: bool, stop_ids: tuple[int, ...],
            generator: torch.Generator | None) -> Iterator[int]:
    device = model.tok_emb.weight.device
    cache = KVCache(model.cfg, 1, len(prompt_ids) + max_new_tokens, device, model.tok_emb.weight.dtype)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]
    for step in range(max_new_tokens):
        if not torch.isfinite(logits).all():  # argmax would pick a NaN's id, multinomial raise a RuntimeError
            raise ValueError("the model's logits are not finite (a NaN or inf weight in the checkpoint?)")
        if greedy:
            nxt = int(logits.argmax())
        else:
            scaled = tempered(logits, temperature)
            if top_k:
                kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = torch.softmax(scaled, -1)
            if top_p < 1:  # nucleus: the most likely tokens until their mass reaches top_p
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        yield nxt
        if nxt in stop_ids or step == max_new_tokens - 1:  # no forward pass for a token never sampled
            return
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]


def generate(model: FelixLM, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All new token ids (the stop token included when one ends the sample)."""
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **kwargs))
