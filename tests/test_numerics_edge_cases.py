"""Numerical edge cases: fake quantization of weights whose block scale overflows, and the closed-form splice
solves under keys of any scale and with a rank-deficient SpliceCore b."""

from __future__ import annotations

import pytest
import torch
from splice_helpers import random_splice_model

import felix.splice_closed as splice_closed
from felix.config import ModelConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.quant_formats import FORMATS, QuantError
from felix.quantize import fake_quantize_model, fake_quantized
from felix.splice_closed import closed_form, closed_form_a
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import inputs_at_targets
from felix.splice_examples import Example


def _quant_model() -> FelixLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=16, splice_every=2,
                      splice_rank=4)
    return FelixLM(cfg).eval()


# -- fake quantization --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rq4", "rq3", "q8_0", "q4_0"])
def test_strict_fake_quant_refuses_an_overflowing_block_scale_as_quantize_does(name):
    """Before, fake_quant turned a block with |w| past the fp16 scale's reach (~8045 for rq4) into inf/NaN
    weights without a word, while quantize refused it."""
    fmt = FORMATS[name]
    x = torch.randn(4, 64)
    x[2, 5] = 1e7  # finite, but its block's fp16 scale is not (for every fp16-scaled format)
    with pytest.raises(QuantError, match="overflows"):
        fmt.quantize(x)
    with pytest.raises(QuantError, match=rf"{name}: a block scale overflows the scale type \(\|weight\| up to 1e\+07"):
        fmt.fake_quant(x, strict=True)
    # the training path does not check (a GPU would stop for every weight): the trainer sees a NaN loss
    assert not fmt.fake_quant_ste(x.clone().requires_grad_()).isfinite().all()
    # NaN weights are the trainer's to see (a NaN loss, a skipped step), as unquantized; plain stays lenient
    x[2, 5] = float("nan")
    assert fmt.fake_quant(x, strict=True)[2].isnan().any() and fmt.fake_quant(x, strict=True)[0].isfinite().all()
    x[2, 5] = 1e7
    assert not fmt.fake_quant(x).isfinite().all()


def test_fake_quantized_models_name_the_tensor_that_overflows():
    """The evaluation paths (the copy calibrate_margin and survival read, the plain parametrization) say which
    tensor overflows; before, the copy held inf weights."""
    model = _quant_model()
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 7] = 9000.0
    x = torch.randint(0, 64, (1, 8))
    with pytest.raises(FelixError, match=r"tensor layers\.1\.mlp\.up_proj\.weight: rq4: a block scale overflows"):
        fake_quantize_model(model, "rq4")
    with (pytest.raises(FelixError, match=r"layers\.1\.mlp\.up_proj\.weight: rq4: .* overflows"),
          fake_quantized(model, "rq4", ste=False)):
        model(x[:, :-1], targets=x[:, 1:])
    # a kept fp16 matrix whose values fp16 cannot hold is refused too, as pack_state refuses it
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 7] = 1.0
        model.tok_emb.weight[0, 0] = 1e5
    with pytest.raises(FelixError, match=r"tensor tok_emb\.weight: \|value\| up to 1e\+05 overflows f16"):
        fake_quantize_model(model, "rq4", "keep")
    assert fake_quantize_model(model, "q8_0").tok_emb.weight.isfinite().all()  # 1e5 / 127 fits its fp16 scale


# -- closed-form splice solves -------------------------------------------------------------------------
def _second_choice(model: FelixLM, prompt: tuple[int, ...]) -> Example:
    with torch.no_grad():
        top = model(torch.tensor([prompt]))[0, -1].argsort(descending=True)
    return Example((*prompt, int(top[1])), len(prompt))


def test_closed_form_a_writes_the_change_its_search_found_when_b_is_rank_deficient(monkeypatch):
    """The search ran in QR's Q of gate·b, which for dependent columns holds directions b cannot write; the codes'
    least-squares fit then dropped that part of the found change without a word (the tiny trained model with 8 of
    b's 16 columns zero: a found margin of +0.22 written as -0.01, the target lost). Now the search runs in
    span(gate·b) itself and the write is exact."""
    model = random_splice_model()
    with torch.no_grad():
        model.splice_cores()[3].b[:, 2:] = 0  # rank 2 of 4
    ex = _second_choice(model, (1, 2, 3, 4, 5, 6))
    found = {}
    search = splice_closed._wanted_changes

    def recording(model, ex, layers, cfg, basis=None, positions=None):
        found["change"] = basis[3] @ (z := search(model, ex, layers, cfg, basis=basis, positions=positions))[3]
        return z

    monkeypatch.setattr(splice_closed, "_wanted_changes", recording)
    core = model.splice_cores()[3]
    after = closed_form_a(model, ex, [3], EditContext(torch.randint(0, 61, (4, 16)), []),
                          EditConfig(rounds=1, delta_steps=30))
    u = inputs_at_targets(model, [3], [ex])[3]
    written = core.gate * core.b.detach() @ (after["layers.3.mlp.splice.a"] - core.a.detach()) @ u
    assert float(found["change"].norm()) > 1
    assert torch.allclose(written, found["change"], atol=1e-3 * float(found["change"].norm()))


def test_closed_form_a_leaves_out_a_layer_whose_b_is_zero():
    """b = 0 (a fresh SpliceCore) can write nothing, like gate 0. Before, the search still gave that layer a
    share of the change, in directions QR made up for the zero matrix, and the write dropped it."""
    model = random_splice_model()
    with torch.no_grad():
        model.splice_cores()[1].b.zero_()
    ex = _second_choice(model, (1, 2, 3, 4, 5, 6))
    ctx, cfg = EditContext(torch.randint(0, 61, (4, 16)), []), EditConfig(rounds=1, delta_steps=30)
    both, alone = closed_form_a(model, ex, [1, 3], ctx, cfg), closed_form_a(model, ex, [3], ctx, cfg)
    assert torch.equal(both["layers.1.mlp.splice.a"], model.splice_cores()[1].a.detach())
    assert torch.equal(both["layers.3.mlp.splice.a"], alone["layers.3.mlp.splice.a"])
    assert not torch.equal(alone["layers.3.mlp.splice.a"], model.splice_cores()[3].a.detach())


@pytest.mark.parametrize("protect", ["nullspace", "ridge"])
def test_closed_form_gives_the_same_edit_whatever_the_scale_of_its_keys(protect):
    """a·s with b/s is the same model with keys k = a·u s times larger; the edit of b must be the same change
    (Δb/s). Before, the solve's μ was absolute (1e-4·I, 1e-6·I): at s = 1e-3 it swamped the keys and the write
    shrank to 1e-5 of itself (nullspace, even at s = 1e-2), and at s = 1e3 the nullspace write came out 1.5x
    larger with 5x its leak into the earlier edit's keys. Powers of two: the rescaled model's logits, and so
    the searched change, are bit for bit the same."""
    cfg = EditConfig(method="closed_form", protect=protect, null_tol=0.5, rounds=1, delta_steps=30)
    ref = None
    for s in (1.0, 2.0**-10, 2.0**10):
        model = random_splice_model()
        core = model.splice_cores()[3]
        with torch.no_grad():
            core.a.mul_(s)
            core.b.div_(s)
        g = torch.Generator().manual_seed(1)
        ctx = EditContext(torch.randint(0, 61, (4, 16), generator=g), [], [_second_choice(model, (7, 8, 9, 10))])
        after = closed_form(model, _second_choice(model, (1, 2, 3, 4, 5, 6)), [3], ctx, cfg)
        change = (after["layers.3.mlp.splice.b"] - core.b.detach()) * s
        ref = change if ref is None else ref
        assert float((change - ref).norm()) < 1e-4 * float(ref.norm()), s
