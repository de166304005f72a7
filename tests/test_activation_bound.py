"""`ActivationBound` holds on every input, is reached by a model built to reach it, and names what passes it."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.activation_bound import LIMIT, ActivationBound
from felix.config import ModelConfig
from felix.model import FelixLM


def measured(model: FelixLM, ids: torch.Tensor) -> tuple[float, dict[int, float]]:
    """The largest residual norm after any block, and each SpliceCore's largest ||A u||, on `ids`."""
    residual, mid, hooks = [0.0], {}, []
    for block in model.layers:
        hooks.append(block.register_forward_hook(
            lambda _m, _i, out: residual.append(float(out.norm(dim=-1).max()))))
        if block.mlp.splice is not None:
            hooks.append(block.mlp.splice.register_forward_hook(
                lambda m, i, _o, layer=block.layer: mid.__setitem__(layer, float((i[0] @ m.a.t()).norm(dim=-1).max()))))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return max(residual), mid


def aligned_model(n_heads: int, n_kv: int) -> FelixLM:
    """Two layers whose every weight moves the residual along e1, so the bound is reached: one token, all
    attention on equal values, SiLU's input large enough that silu(z) is z, one live MLP channel."""
    cfg = ModelConfig(vocab_size=8, n_layers=2, d_model=4, n_heads=n_heads, n_kv_heads=n_kv, d_ff=4,
                      max_seq_len=8, splice_every=1, splice_rank=1)
    model = FelixLM(cfg)
    e1 = torch.zeros(4)
    e1[0] = 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_emb.weight[0] = 3.0 * e1
        for i, block in enumerate(model.layers):
            block.attn_norm.weight.fill_(1.0 + i)
            block.mlp_norm.weight.fill_(0.5)
            block.attn.v_proj.weight[0, 0] = 2.0  # kv head 0 reads e1
            # o maps every query head's copy of it (GQA repeats kv head 0) onto e1, with Frobenius norm 1.5
            heads = n_heads // n_kv
            for h in range(heads):
                block.attn.o_proj.weight[0, h * cfg.head_dim] = 1.5 / math.sqrt(heads)
            block.mlp.gate_proj.weight[0, 0] = 30.0  # silu(30) is 30 to 1e-13
            block.mlp.up_proj.weight[0, 0] = 0.7
            block.mlp.down_proj.weight[0, 0] = 1.3
            block.mlp.splice.a[0, 0] = 0.9
            gate = -1.5 if i else 1.0  # a negative gate adds along e1 too, with b's sign turned
            block.mlp.splice.b[0, 0] = 2.5 * math.copysign(1.0, gate)
            block.mlp.splice.gate.fill_(gate)
    return model


def test_a_model_built_to_reach_the_bound_reaches_it():
    for n_heads, n_kv in ((1, 1), (2, 1), (2, 2)):
        model = aligned_model(n_heads, n_kv)
        bound = ActivationBound(model).of(model)
        residual, mid = measured(model, torch.zeros(1, 5, dtype=torch.long))
        assert residual <= bound.residual * (1 + 1e-6), (n_heads, n_kv)
        assert residual >= bound.residual * (1 - 1e-5), (n_heads, n_kv, residual, bound)
        for layer, m in mid.items():
            assert bound.splice_mid[layer] * (1 - 1e-5) <= m <= bound.splice_mid[layer] * (1 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
       layers=st.integers(1, 3), scales=st.lists(st.floats(-2, 2), min_size=4, max_size=4))
def test_no_input_passes_the_bound(seed, heads, layers, scales):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, n_layers=layers, d_model=8, n_heads=heads[0], n_kv_heads=heads[1], d_ff=12,
                      max_seq_len=16, splice_every=1, splice_rank=2)
    model = FelixLM(cfg)
    emb, weights, norms, splice = (10.0**s for s in scales)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (norms if "norm" in name else emb if "tok_emb" in name
                                           else splice if "splice" in name else weights))
        for core in model.splice_cores().values():
            core.gate.fill_(float(torch.randn(())) * 10)
    bound = ActivationBound(model).of(model)
    residual, mid = measured(model, torch.randint(0, 16, (3, 16)))
    assert residual <= bound.residual * (1 + 1e-5)
    for layer, m in mid.items():
        assert m <= bound.splice_mid[layer] * (1 + 1e-5)


def test_what_passes_the_limit_is_named():
    model = aligned_model(2, 1)
    bounds = ActivationBound(model)
    assert bounds.of(model).worst() is None
    core = model.layers[1].mlp.splice
    with torch.no_grad():
        core.b.zero_()
        core.a.fill_(1e30)  # with b at zero it adds nothing, but A·u itself is past the limit
        what, value = bounds.of(model).worst()
        assert (what, value > LIMIT) == ("layer 1's SpliceCore A·u", True)
        core.a.fill_(1.0)
        core.b.fill_(1e30)
        core.gate.fill_(0.0)  # off: it adds nothing, but forming gate·B is still checked
        assert bounds.of(model).worst() is None
        core.gate.fill_(1e10)
        assert bounds.of(model).worst()[0] == "layer 1's SpliceCore gate·B"
        core.b.fill_(1e5)
        assert bounds.of(model).worst()[0] == "the residual stream"


def test_frozen_weights_past_the_limit_are_named_before_any_splice_core():
    """No SpliceCore state is within the limit then; naming a SpliceCore (also past it here) would send the
    user to roll back patches that cannot help."""
    model = aligned_model(2, 1)
    with torch.no_grad():
        model.tok_emb.weight[0] *= LIMIT  # the embedding row alone is past it
        model.layers[1].mlp.splice.a.fill_(1e30)
    bound = ActivationBound(model).of(model)
    what, value = bound.worst()
    assert what.startswith("the residual stream, whatever SpliceCore holds") and value == bound.base > LIMIT
