"""Edge inputs of the splice methods and of diagnosis: repeated or unordered layers, layers without a SpliceCore
or with gate 0, callers under no_grad, neutral prompts at max_seq_len, and attribution through later layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from splice_helpers import counterfactual, random_splice_model

from felix.errors import FelixError
from felix.splice_closed import closed_form, closed_form_a
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import inputs_at_targets
from felix.splice_diagnose import attributions
from felix.splice_examples import Example, last_position_examples
from felix.splice_kl import kl_train


def _equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_attribution_of_a_lower_layer_counts_its_path_through_the_later_mlps():
    """u_j's effect is |u_j dm/du_j| with dm/du_j the whole derivative. Before, each diagnosed layer's u was cut
    from the graph, so a lower layer's gradient skipped every later diagnosed MLP: layer 1's effects changed
    when layer 3 was diagnosed with it (by up to 25% of the largest), and diagnose diagnoses both."""
    model = random_splice_model()
    ex, target, predicted = Example((1, 2, 3, 4, 5, 6), 5), 6, 7
    alone = attributions(model, [ex], [(target, predicted)], layers=[1])[1]
    both = attributions(model, [ex], [(target, predicted)], layers=[1, 3])
    # the exact derivative, through W_down and the SpliceCore of layer 1 and everything after
    eps = torch.zeros(model.cfg.d_ff, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def shift(_m, args):
        seen["u"] = args[0].detach()
        u = args[0].clone()
        u[0, -1] = u[0, -1] + eps
        return (u,)

    mlp = model.layers[1].mlp
    hooks = [mlp.down_proj.register_forward_pre_hook(shift), mlp.splice.register_forward_pre_hook(shift)]
    lp = torch.log_softmax(model(torch.tensor([ex.ids[: ex.n_prompt]]))[0, -1], -1)
    (grad,) = torch.autograd.grad(lp[target] - lp[predicted], eps)
    for h in hooks:
        h.remove()
    exact = (seen["u"][0, -1] * grad).abs()
    assert torch.allclose(alone, exact, atol=1e-6) and torch.allclose(both[1], exact, atol=1e-6)
    assert torch.equal(both[3], attributions(model, [ex], [(target, predicted)], layers=[3])[3])
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_a_layer_given_twice_is_edited_once(tiny_wide):
    """Before: closed_form_a at [1, 1, 3] wrote 20 times the change of [1, 3] (each repeat solved the same codes
    again, on top), closed_form at [3, 3] twice that of [3], and kl_train handed Adam the same tensors twice."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, rank=1)
    ctx = EditContext(preserve[:2], [tok.encode("import ")])
    cfg = EditConfig(delta_steps=100)
    assert _equal(closed_form_a(model, ex, [1, 1, 3], ctx, cfg), closed_form_a(model, ex, [1, 3], ctx, cfg))
    cf = cfg.replace(method="closed_form", rounds=1)
    assert _equal(closed_form(model, ex, [3, 3], ctx, cf), closed_form(model, ex, [3], ctx, cf))
    kl = cfg.replace(method="kl_train", steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "optimizer contains a parameter group with duplicate parameters"
        assert _equal(kl_train(model, ex, [3, 3], ctx, kl), kl_train(model, ex, [3], ctx, kl))


def test_closed_form_solves_its_layers_bottom_up_in_any_order_given(tiny_wide):
    """Diagnosis lists its chosen layers by attribution share, highest first. Before, closed_form solved them in
    that order, so a layer's keys could be read before a lower layer's update moved them."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, rank=1)
    ctx = EditContext(preserve[:2], [])
    cfg = EditConfig(method="closed_form", delta_steps=100, rounds=1)
    assert _equal(closed_form(model, ex, [3, 1], ctx, cfg), closed_form(model, ex, [1, 3], ctx, cfg))


@pytest.mark.parametrize("method", [closed_form_a, closed_form, kl_train])
def test_a_layer_without_splicecore_is_refused_by_name(tiny_wide, method):
    """Before: a bare KeyError (0, or 'layers.0.mlp.splice.a')."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, rank=1)
    state = model.splice_state()
    with pytest.raises(FelixError, match=r"layers \[0, 2\] have no SpliceCore .*\[1, 3\]"):
        method(model, ex, [3, 2, 0], EditContext(preserve[:2], []), EditConfig(steps=1, delta_steps=1))
    assert _equal(model.splice_state(), state)


def test_closed_form_refuses_a_protection_it_does_not_know(tiny_wide):
    """Before: any other value than "nullspace" (a typo, "null_space") silently ran the ridge."""
    model, tok, _, _, preserve = tiny_wide
    with pytest.raises(FelixError, match="protect must be ridge or nullspace, got 'null_space'"):
        closed_form(model, counterfactual(model, tok, rank=1), [3], EditContext(preserve[:2], []),
                    EditConfig(method="closed_form", protect="null_space"))


def test_gate_zero_layers_are_left_out_of_the_closed_forms(tiny_wide):
    """A gate-0 layer cannot carry a write. Before, closed_form still gave it a share of the wanted change (and
    wrote the rest alone), and closed_form_a without kept covariances failed ('max() arg is an empty sequence')
    when every layer it was given had gate 0."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, rank=1)
    state = model.splice_state()
    ctx = EditContext(preserve[:2], [])
    cfg = EditConfig(method="closed_form", delta_steps=100, rounds=1)
    try:
        with torch.no_grad():
            model.splice_cores()[1].gate.zero_()
        want = closed_form(model, ex, [3], ctx, cfg)
        got = closed_form(model, ex, [1, 3], ctx, cfg)
        assert _equal({k: v for k, v in got.items() if ".3." in k}, want)
        assert torch.equal(got["layers.1.mlp.splice.b"], state["layers.1.mlp.splice.b"])
        with torch.no_grad():
            model.splice_cores()[3].gate.zero_()
        after = closed_form_a(model, ex, [1, 3], ctx, EditConfig())
        assert set(after) == {"layers.1.mlp.splice.a", "layers.3.mlp.splice.a"}
        assert _equal(after, {k: state[k] for k in after})
        unchanged = closed_form(model, ex, [1, 3], ctx, cfg)
        assert _equal(unchanged, {k: state[k] for k in unchanged})
    finally:
        model.load_splice_state(state)


@pytest.mark.parametrize("method", [closed_form_a, kl_train])
def test_a_method_called_under_no_grad_still_edits_and_leaves_grad_off(tiny_wide, method):
    """Before: 'element 0 of tensors does not require grad' (the wanted-change search and kl_train need
    gradients, and a caller's no_grad turned them off; diagnosis already turned them on for itself)."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, rank=1)
    ctx = EditContext(preserve[:2], [])
    cfg = EditConfig(steps=2, delta_steps=20, rounds=1)
    want = method(model, ex, [3], ctx, cfg)
    with torch.no_grad():
        got = method(model, ex, [3], ctx, cfg)
        assert not torch.is_grad_enabled()
    assert _equal(got, want)


@pytest.mark.parametrize("neutral_tokens", [1, 4])
def test_a_neutral_prompt_of_max_seq_len_tokens_is_kept(tiny_wide, neutral_tokens):
    """A prompt of max_seq_len tokens has a next token, and the budget reads it. Before, closed_form_a read its
    key from the prompt plus a never-read token 0, one position past max_seq_len, and failed ('sequence of 65
    positions exceeds max_seq_len 64'; with neutral_tokens > 1, 'has no room to continue')."""
    model, tok, _, _, preserve = tiny_wide
    limit = model.cfg.max_seq_len
    long = tok.encode("def __init__(self, name, value):\n        self.name = name\n" * 8)[:limit]
    assert len(long) == limit
    ex = counterfactual(model, tok, rank=1)
    cfg = EditConfig(neutral_tokens=neutral_tokens, delta_steps=100)
    after = closed_form_a(model, ex, [3], EditContext(preserve[:2], [long]), cfg)
    da = after["layers.3.mlp.splice.a"] - model.splice_cores()[3].a.detach()
    key = inputs_at_targets(model, [3], last_position_examples([long]))[3]
    assert key.shape == (model.cfg.d_ff, 1)
    assert float((da @ key).norm()) < 1e-3 * float(da.norm() * key.norm())
