"""NextTokenCheck: prompt repair's re-read of the preservation prompts' next tokens from a kept stream."""

from __future__ import annotations

import pytest
import torch
from test_splice_prompts import KIND

from felix.splice_examples import greedy_continuations
from felix.splice_next_tokens import NextTokenCheck


def test_next_token_check_reads_what_greedy_decoding_does_after_writes_at_or_above_its_start(tiny_wide):
    model, tok, *_ = tiny_wide
    # mixed lengths, so a chunk is right-padded and the length sort moves prompts around
    prompts = [tok.encode(p) for p in KIND[:40]] + [tok.encode("x"), tok.encode("def f(a, b):\n    return a +")]
    cores = model.splice_cores()
    state = model.splice_state()
    try:
        for start in range(model.cfg.n_layers):
            check = NextTokenCheck(model, prompts, start, chunk=16)
            assert check() == [c[0] for c in greedy_continuations(model, prompts, 1)]
            above = [layer for layer in cores if layer >= start]
            for L in above:  # a large write, so many next tokens move
                g = torch.Generator().manual_seed(L)
                with torch.no_grad():
                    for t in (cores[L].a, cores[L].b):
                        t.add_(torch.randn(t.shape, generator=g))
            now = check()
            assert now == [c[0] for c in greedy_continuations(model, prompts, 1)]
            if above:
                model.load_splice_state(state)
                assert check() != now, "the write moved no next token: the check was not exercised"
    finally:
        model.load_splice_state(state)


def test_next_token_check_refuses_a_start_outside_the_model_and_an_empty_prompt(tiny_wide):
    model, tok, *_ = tiny_wide
    with pytest.raises(ValueError, match="outside the model"):
        NextTokenCheck(model, [tok.encode("a")], model.cfg.n_layers)
    with pytest.raises(ValueError, match="does not fit"):
        NextTokenCheck(model, [[]], 0)


def test_next_token_check_reads_each_prompts_lead_of_a_given_token_over_the_runner_up(tiny_wide):
    model, tok, *_ = tiny_wide
    prompts = [tok.encode(p) for p in KIND[:20]]
    tokens, leads = NextTokenCheck(model, prompts, 1, chunk=8).read()
    other = [(t + 1) % model.cfg.vocab_size for t in tokens]
    _, other_leads = NextTokenCheck(model, prompts, 3).read(other)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            logits = model(torch.tensor([p]))[0, -1]
        top2 = logits.topk(2).values
        assert leads[i] == pytest.approx(float(top2[0] - top2[1]), abs=1e-4)
        assert other_leads[i] == pytest.approx(float(logits[other[i]] - logits[tokens[i]]), abs=1e-4)
    assert (leads >= 0).all() and (other_leads <= 0).all()
