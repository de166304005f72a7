"""Edge cases of the quantization math and QUAIL: re-rounding weights already on a format's grid, the
calibration's degenerate inputs (the survival of an edited checkpoint is in test_survival.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.config import ModelConfig
from felix.model import FelixLM
from felix.objective import calibrate_margin
from felix.quail import Whitelist, logit_noise, margin_from_noise, margin_shift
from felix.quant_formats import FORMATS, get_format
from felix.quant_gptq import gptq_round
from felix.quantize import fake_quantize_model


# -- re-rounding is the identity on the grid -----------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**16),
       # log2 of the weights' scale: anywhere, and often where a 4-bit block's fp16 scale is subnormal
       exponent=st.one_of(st.floats(-45, 10), st.floats(-30, -24)),
       kind=st.sampled_from(["normal", "equal", "one"]))
def test_fake_quant_of_a_fake_quantized_tensor_changes_nothing(name, exponent, seed, kind):
    """fake_quant(fake_quant(W)) == fake_quant(W) at every magnitude, subnormal scales included."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, fmt.block, generator=g, dtype=torch.float64)
    if kind == "equal":
        x = x[:, :1].expand(-1, fmt.block)
    elif kind == "one":
        x = x * (torch.arange(fmt.block) == seed % fmt.block)
    x = (x * 2.0**exponent).float()  # up to 2^10: every block scale fits fp16
    q = fmt.fake_quant(x)
    assert torch.equal(fmt.fake_quant(q), q)
    assert torch.equal(fmt.dequantize(fmt.quantize(q), q.shape), q)


def test_a_block_whose_rq4_scale_rounds_up_in_the_fp16_subnormals_is_stable():
    """absmax/c15 = 1.6·2⁻²⁴ stores d = 2·2⁻²⁴, where the absmax weight is nearer c14 than c15: its
    re-rounding derived a scale half as large and moved every weight of the block."""
    fmt = get_format("rq4")
    w = torch.zeros(1, 32)
    w[0, 0] = 1.6 * 2.0**-24 * fmt.max_abs
    w[0, 1] = -0.3 * w[0, 0]
    q = fmt.fake_quant(w)
    assert torch.equal(fmt.fake_quant(q), q)
    assert float(q.abs().max()) == float(fmt.block_scale(q).max()) * fmt.max_abs  # the extreme code


def test_gptq_with_a_diagonal_covariance_is_plain_rounding_for_tiny_blocks():
    """GPTQ pins each block's absmax to the extreme code; plain rounding must agree with it there."""
    fmt = get_format("rq4")
    g = torch.Generator().manual_seed(0)
    peak = 0.7 * 2.0**-24 * fmt.max_abs  # stores d = 2^-24, where the peak is nearest c14
    w = (torch.rand(4, 64, generator=g) * 2 - 1) * 0.6 * peak
    w[:, ::32] = peak
    assert torch.equal(gptq_round(w, torch.eye(64), fmt), fmt.fake_quant(w))


# -- QUAIL calibration --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["logit_noise", "margin_shift"])
def test_calibration_without_whitelisted_targets_skips_ignored_positions(method):
    """The fallback to every position leaves out the targets cross-entropy ignores (-100), as the
    objective does: margin_shift indexed the logits with -100 and crashed."""
    torch.manual_seed(0)
    model = FelixLM(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=16,
                                splice_every=1, splice_rank=4))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(1, 64, (2, 16))
    ignored = y.clone()
    ignored[:, :4] = -100
    whitelist = Whitelist((0,), ("x",))  # token 0 is never a target here
    margin = calibrate_margin(model, [(x, ignored)], whitelist, "rq4", 99.0, method)
    keep = ignored != -100
    with torch.no_grad():
        quant = fake_quantize_model(model, "rq4")
        z, zq = model.lm_head(model.final_hidden(x)[keep]), quant.lm_head(quant.final_hidden(x)[keep])
    if method == "margin_shift":
        assert margin == margin_from_noise(margin_shift(z, zq, ignored[keep]), 99.0) / 2
    else:
        assert margin == margin_from_noise(logit_noise(z, zq), 99.0)
