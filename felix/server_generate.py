"""The splice server's generation, free of HTTP and of the service: sampling with a KV cache from one model
(a snapshot's: `felix.server_api`), each token with its log-probabilities, and the text released as it
becomes final (stop strings held back, no half characters), with the tokens that begin in it."""

from __future__ import annotations

import bisect
import codecs
import math
import time
from collections.abc import Iterator

import numpy as np
import torch

from felix.generate import tempered
from felix.model import FelixLM, KVCache
from felix.server_common import ApiError, Delta, GenParams, GenResult, TokenLogprob
from felix.tokenizer import FelixTokenizer


@torch.no_grad()
def sample_tokens(model: FelixLM, ids: list[int], p: GenParams, stop_ids: set[int]) -> Iterator[TokenLogprob]:
    """Each token sampled, with its log-probability (and `p.top_logprobs` rivals') under `model`'s
    untempered distribution, as OpenAI and vLLM report them; ends after a stop id or the budget."""
    limit = model.cfg.max_seq_len
    n = min(p.max_tokens, limit - len(ids))
    device = model.tok_emb.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed if p.seed is not None else int.from_bytes(np.random.bytes(6), "little"))
    cache = KVCache(model.cfg, 1, len(ids) + n, device, model.tok_emb.weight.dtype)
    logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1].float()
    for step in range(n):
        if not torch.isfinite(logits).all():
            raise ApiError(500, "INTERNAL_ERROR", "the model's logits are not finite")
        logp = torch.log_softmax(logits, -1)
        if p.temperature <= 0:
            nxt = int(logits.argmax())
        else:
            q = torch.softmax(tempered(logits, p.temperature), -1)
            if p.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
                sq, order = torch.sort(q, descending=True)
                keep = torch.cumsum(sq, 0) - sq < p.top_p
                q = torch.zeros_like(q).scatter_(0, order[keep], sq[keep])
            nxt = int(torch.multinomial(q, 1, generator=gen))
        top: tuple[tuple[int, float], ...] = ()
        if p.top_logprobs:
            values, order = torch.topk(logp, min(p.top_logprobs, logp.numel()))
            top = tuple(zip(order.tolist(), values.tolist(), strict=True))
        yield TokenLogprob(nxt, float(logp[nxt]), top)
        if nxt in stop_ids or step == n - 1:
            return
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1].float()


def ablated(model: FelixLM, layers: list[int]) -> FelixLM:
    """`model` with the gates of `layers` zeroed, for one request: a twin sharing every weight, so the served
    model is never touched."""
    twin = model.splice_twin()
    cores = twin.splice_cores()
    for layer in layers:
        cores[layer].gate.zero_()
    return twin


def stream_completion(model: FelixLM, tok: FelixTokenizer, ids: list[int], p: GenParams,
                      stop_ids: set[int]) -> Iterator[Delta | GenResult]:
    """Text deltas as they become final, each with the tokens that begin in it (with `p.top_logprobs`), then
    one GenResult."""
    t0 = time.perf_counter()
    if p.ablate:
        model = ablated(model, p.ablate)
    out: list[int] = []
    probs: list[float] = []
    printed, reason, text = 0, "length", ""
    hold = max((len(s) for s in p.stop), default=1) - 1  # chars that may still become a stop string
    # With logprobs: each token's first character in the decoded text (the characters an incremental
    # UTF-8 decoder has produced before it), so a delta carries the tokens that begin in the text sent.
    steps: list[TokenLogprob] = []
    starts: list[int] = []
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    decoded = released = 0
    for step in sample_tokens(model, ids, p, stop_ids):
        probs.append(math.exp(step.logprob))
        if step.token in stop_ids:
            reason = "stop"
            break
        out.append(step.token)
        if p.top_logprobs is not None:
            steps.append(step)
            starts.append(decoded)
            decoded += len(utf8.decode(tok.token_bytes(step.token)))
        text = tok.decode(out)
        cut = min((i for s in p.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
        ready = len(text) - hold
        if ready > printed and not text[:ready].endswith("\ufffd"):  # a character still arriving
            n = bisect.bisect_left(starts, ready)
            yield Delta(text[printed:ready], steps[released:n])
            printed, released = ready, n
    n = bisect.bisect_left(starts, len(text))  # a token cut off by a stop string is not in the text
    if len(text) > printed or n > released:
        yield Delta(text[printed:], steps[released:n])
    yield GenResult(text, reason, len(ids), len(probs), probs, (time.perf_counter() - t0) * 1e3, steps[:n])
