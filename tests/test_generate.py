"""KV-cached generation agrees with recomputing the full sequence each step."""

from __future__ import annotations

import pytest
import torch

from felix.config import ModelConfig
from felix.generate import generate
from felix.model import FelixLM

CFG = ModelConfig(vocab_size=97, n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=40,
                  splice_every=2, splice_rank=4)


@pytest.fixture(scope="module")
def model() -> FelixLM:
    torch.manual_seed(0)
    m = FelixLM(CFG).eval()
    for core in m.splice_cores().values():  # a live, non-zero SpliceCore must be honoured by the cache path
        torch.nn.init.normal_(core.b, std=0.05)
    return m


@torch.no_grad()
def naive_greedy(model: FelixLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_full_recompute(model):
    prompt = [5, 17, 3, 88, 42]
    assert generate(model, prompt, 20, greedy=True) == naive_greedy(model, prompt, 20)


def test_stops_at_stop_token_and_at_context_limit(model):
    first = generate(model, [1, 2, 3], 1, greedy=True)[0]
    assert generate(model, [1, 2, 3], 10, greedy=True, stop_ids=(first,)) == [first]
    assert len(generate(model, list(range(30)), 100, greedy=True)) == CFG.max_seq_len - 30


def test_sampling_is_seeded(model):
    def draw(seed):
        return generate(model, [7, 8], 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(seed))
    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_bad_prompts_are_errors(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="no room"):
        generate(model, list(range(40)), 3)
