"""Edge cases of the sequential splice bench's metrics (felix.splice_bench.run_bench) on a tiny model."""

from __future__ import annotations

import pytest
from splice_helpers import counterfactual

from felix.heldout import HeldoutText
from felix.splice_bench import run_bench
from felix.splice_config import EditConfig
from felix.splice_edit import EditRequest

NEUTRAL = ["class ", "if ", "for ", "x = "]


def _request(model, tok, prompt: str, paraphrases: list[str]) -> EditRequest:
    ex = counterfactual(model, tok, prompt, rank=1)
    return EditRequest(prompt, tok.decode(ex.target), paraphrases, NEUTRAL, id=prompt)


def test_an_edit_without_paraphrases_is_no_paraphrase_failure(tiny):
    model, tok, _, heldout, preserve = tiny
    requests = [_request(model, tok, "def __init__(self", [" def __init__(self"]), _request(model, tok, "import ", [])]
    cfg = EditConfig("kl_train", layers=[3], steps=40, lr=0.03, max_ppl_increase=1, max_neutral_kl=10)
    out = run_bench(model, tok, requests, 2, cfg, HeldoutText.of(heldout), preserve)
    first, second = out["steps"]
    assert first["accepted"] and second["accepted"]
    assert first["paraphrase"] > 0  # else the mean below could not tell a zero counted in from one left out
    # the second edit has no paraphrases: nothing to generalize to, so no share (it read 0.0 and halved the mean)
    assert second["paraphrase"] is None
    assert out["final"]["paraphrase_rate_when_applied"] == first["paraphrase"]


def test_a_bench_without_paraphrases_reports_no_paraphrase_rate(tiny):
    model, tok, _, heldout, preserve = tiny
    requests = [_request(model, tok, "import ", [])]
    # a budget no edit meets: the edit is rejected, and the step reports no paraphrase share either
    cfg = EditConfig("kl_train", layers=[3], steps=2, lr=0.03, max_ppl_increase=-1, max_neutral_kl=10)
    out = run_bench(model, tok, requests, 1, cfg, HeldoutText.of(heldout), preserve, circuit_every=1000,
                    requantizers={"requantized": lambda m, _applied: None})
    assert not out["steps"][0]["accepted"] and out["steps"][0]["paraphrase"] is None
    final = out["final"]
    assert final["paraphrase_rate"] is None and final["paraphrase_rate_when_applied"] is None
    assert final["requantized"]["paraphrase_rate"] is None
    assert final["success_rate"] == 0 and final["locality_rate"] == pytest.approx(1.0)
