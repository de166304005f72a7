"""`make-edits`' code-fact finding, checked exactly against an n-gram oracle that holds every fact of its
documents, and the next-token shares behind its habit filter."""

from __future__ import annotations

import numpy as np
from splice_helpers import NgramOracle

from felix.splice_examples import greedy_hits, make_example


def test_make_edits_finds_held_facts_and_rewrites_them(tiny):
    from felix.splice_data import corpus_documents, make_edits

    model, tok, ckpt, *_ = tiny
    docs = corpus_documents(ckpt, tok, max_docs=6)
    oracle = NgramOracle(tok, docs, model.cfg.model_copy(update={"max_seq_len": 4096}))
    reqs = make_edits(oracle, tok, docs, 5, n_neutral=3)
    assert len(reqs) == 5 and len({r.prompt for r in reqs}) == 5
    edited = {r.prompt for r in reqs}
    for r in reqs:
        assert r.prompt.split("\n")[-1] in r.paraphrases and len(r.neutral) == 3
        assert not edited & set(r.neutral)  # neutral prompts are facts nobody edits
        # nor one ending in an edited line, indented otherwise (it would be that edit's paraphrase)
        assert not {e.split("\n")[-1].strip() for e in edited} & {n.split("\n")[-1].strip() for n in r.neutral}
        # the original continuation is held, the counterfactual target is not
        assert greedy_hits(oracle, [make_example(tok, r.prompt, r.target, 4096)]) == [False]
        for n in r.neutral:
            assert any(greedy_hits(oracle, [make_example(tok, n, t, 4096)]) for t in _next_words(docs, n))


def test_make_edits_asking_too_many_says_how_many_fit(tiny):
    """Before: `--n 500` on a model holding 126 facts said "need 506", leaving the neutral prompts' share and
    the largest --n that works to guess."""
    import re

    import pytest

    from felix.errors import FelixError
    from felix.splice_data import corpus_documents, make_edits

    model, tok, ckpt, *_ = tiny
    docs = corpus_documents(ckpt, tok, max_docs=6)
    oracle = NgramOracle(tok, docs, model.cfg.model_copy(update={"max_seq_len": 4096}))
    with pytest.raises(FelixError, match=r"--n 10000 needs 10005 \(5 more for neutral prompts\)") as info:
        make_edits(oracle, tok, docs, 10_000, n_neutral=3)
    found = int(re.search(r"found only (\d+) facts", str(info.value)).group(1))
    most = int(re.search(r"--n (\d+) at most", str(info.value)).group(1))
    assert most == found - 5 > 0
    assert len(make_edits(oracle, tok, docs, most, n_neutral=3)) == most


def _next_words(docs: list[str], prompt: str) -> list[str]:
    import re

    out = []
    for d in docs:
        i = d.find(prompt)
        if i >= 0:
            m = re.match(r" ?[A-Za-z_][A-Za-z0-9_]*", d[i + len(prompt):])
            out += [m.group(0)] if m else []
    return out


def test_next_token_shares_count_bigrams():
    from felix.splice_data import NextTokenShares

    s = NextTokenShares([np.array([1, 2, 1, 2, 1, 3]), np.array([1, 2])], vocab_size=8)
    # token 1 is followed by 2 three times and by 3 once; 7 never occurs
    assert s.share(1, 2) == 0.75 and s.share(1, 3) == 0.25 and s.share(1, 1) == 0.0
    assert s.share(2, 1) == 1.0 and s.share(7, 1) == 0.0
    capped = NextTokenShares([np.array([1, 2, 1, 3])], vocab_size=8, max_tokens=2)
    assert capped.share(1, 2) == 1.0 and capped.share(1, 3) == 0.0
    pairs = NextTokenShares([np.array([1, 2, 1, 2, 1, 3]), np.array([1, 2])], vocab_size=8, context=2)
    assert pairs.share([1, 2], 1) == 1.0 and pairs.share([5, 2, 1], 2) == 0.5 and pairs.share([2, 1], 3) == 0.5
    assert pairs.context_count([2, 1]) == 2 and pairs.share([3], 1) == 0.0 and pairs.share([7, 7], 1) == 0.0


def test_make_edits_leaves_out_habits(tiny):
    from felix.splice_data import NextTokenShares, corpus_documents, make_edits

    model, tok, ckpt, *_ = tiny
    docs = corpus_documents(ckpt, tok, max_docs=6)
    oracle = NgramOracle(tok, docs, model.cfg.model_copy(update={"max_seq_len": 4096}))
    shares = NextTokenShares([np.array(tok.encode(d)) for d in docs], model.cfg.vocab_size)
    reqs = make_edits(oracle, tok, docs, 5, n_neutral=3, shares=shares, max_habit=0.1, lines_per_doc=48)
    assert len(reqs) == 5
    for text in [r.prompt for r in reqs] + [n for r in reqs for n in r.neutral]:
        ids = tok.encode(text)
        held = [w for w in _next_words(docs, text) if greedy_hits(oracle, [make_example(tok, text, w, 4096)])[0]]
        assert held and all(shares.share(ids[-1], tok.encode(w)[0]) < 0.1 for w in held)
    # and the filter is what kept them out: without it, some fact's target is a habit
    every = make_edits(oracle, tok, docs, 5, n_neutral=3, lines_per_doc=48)
    habits = [shares.share(tok.encode(r.prompt)[-1], tok.encode(w)[0]) for r in every
              for w in _next_words(docs, r.prompt)]
    assert max(habits) >= 0.1
