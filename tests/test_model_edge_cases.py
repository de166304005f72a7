"""Edge cases of the model core and of sampling: KV-cache decoding in uneven chunks, and extreme temperatures."""

from __future__ import annotations

import pytest
import torch

from felix.config import ModelConfig
from felix.generate import generate
from felix.model import FelixLM, KVCache


def _model(n_kv_heads: int | None, max_seq_len: int = 20) -> FelixLM:
    cfg = ModelConfig(vocab_size=61, n_layers=2, d_model=48, n_heads=6, n_kv_heads=n_kv_heads, d_ff=80,
                      max_seq_len=max_seq_len, splice_every=1, splice_rank=3)
    torch.manual_seed(0)
    model = FelixLM(cfg).eval()
    for i, core in enumerate(model.splice_cores().values()):  # live SpliceCores with gates other than 1
        torch.nn.init.normal_(core.b, std=0.1)
        core.gate.fill_(-0.7 + 1.9 * i)
    return model


@pytest.mark.parametrize("n_kv_heads", [None, 3, 2, 1], ids=["mha", "gqa2", "gqa3", "mqa"])
# a prefill then steps, several new queries over cached keys (the explicit mask), and the last position
@pytest.mark.parametrize("split", [[20], [1] * 20, [19, 1], [5, 7, 1, 7], [1, 1, 18]],
                         ids=["whole", "one-by-one", "19+1", "5+7+1+7", "1+1+18"])
def test_cached_forward_in_any_chunks_equals_the_full_forward_up_to_max_seq_len(n_kv_heads, split):
    model = _model(n_kv_heads)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    cache, parts, pos = KVCache(model.cfg, 2, 20, "cpu"), [], 0
    with torch.no_grad():
        full = model(idx)
        for n in split:
            parts.append(model(idx[:, pos : pos + n], cache=cache))
            pos += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-45])
def test_a_tiny_positive_temperature_samples_the_greedy_tokens(temperature):
    # logits / 1e-40 overflowed to inf, and softmax of inf is NaN: multinomial raised RuntimeError
    model = _model(2)
    with torch.no_grad():
        torch.nn.init.normal_(model.tok_emb.weight, std=1.0)  # logits of a trained model's size, not ~0
    greedy = generate(model, [3, 1, 4], 8, greedy=True)
    sampled = generate(model, [3, 1, 4], 8, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert sampled == greedy
