"""KV-cached generation agrees with recomputing the full sequence each step."""

from __future__ import annotations

import pytest
import torch

from felix.config import ModelConfig
from felix.generate import generate, stream_tokens
from felix.model import FelixLM
from felix.server_common import GenParams
from felix.server_generate import sample_tokens

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


@torch.no_grad()
def naive_sample(model: FelixLM, prompt: list[int], n: int, temperature: float, top_k: int, seed: int) -> list[int]:
    gen, ids = torch.Generator().manual_seed(seed), list(prompt)
    for _ in range(n):
        scaled = model(torch.tensor([ids]))[0, -1].float() / temperature
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1], float("-inf"))
        ids.append(int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen)))
    return ids[len(prompt):]


def test_sampling_with_cache_equals_full_recompute_up_to_the_context_limit(model):
    prompt = list(range(5, 33))
    for seed in range(3):
        got = generate(model, prompt, 50, temperature=0.7, top_k=20, generator=torch.Generator().manual_seed(seed))
        assert got == naive_sample(model, prompt, CFG.max_seq_len - len(prompt), 0.7, 20, seed)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),  # was "KV cache full" from deep in the model
])
def test_bad_arguments_raise_on_the_call_not_the_first_token(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stream_tokens(model, [1, 2], **{"max_new_tokens": 3, **kwargs})  # never iterated


def test_temperature_zero_is_greedy_and_no_forward_pass_is_wasted(model):
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert generate(model, [4, 5, 6], 7, temperature=0.0) == naive_greedy(model, [4, 5, 6], 7)
        calls.clear()
        generate(model, [4, 5, 6], 7, greedy=True)
    finally:
        hook.remove()
    assert len(calls) == 7  # the prefill, then one step per token after the first; none after the last


@pytest.mark.parametrize("temperature", [1e-50, 5e-324])
def test_a_temperature_that_is_zero_in_float32_samples_greedily(model, temperature):
    # positive, so accepted, but 0 in float32: the likeliest token's logit became 0/0 = NaN and multinomial
    # raised (`felix generate` a traceback, the server a 500)
    prompt = [4, 5, 6]
    want = naive_greedy(model, prompt, 8)
    for top_k, top_p in ((0, 1.0), (10, 0.5)):
        got = generate(model, prompt, 8, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=torch.Generator().manual_seed(0))
        assert got == want
    p = GenParams(max_tokens=8, temperature=temperature, seed=0)
    assert [s.token for s in sample_tokens(model, prompt, p, set())] == want


@pytest.mark.parametrize("kwargs", [{"greedy": True}, {"temperature": 0.8, "top_k": 10}])
def test_non_finite_logits_are_an_error_not_a_token(kwargs):
    # a diverged checkpoint: greedy returned argmax(NaN) as if it were a token, sampling raised RuntimeError
    torch.manual_seed(0)
    broken = FelixLM(CFG).eval()
    with torch.no_grad():
        broken.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits are not finite"):
        generate(broken, [1, 2, 3], 4, **kwargs)
