"""GPTQ rounding: plain rounding when H is diagonal, on the grid, lower output error, and the OBS update."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.quant_formats import QuantError, get_format
from felix.quant_gptq import gptq_round

CODEBOOK_FORMATS = ["rq4", "rq3", "nf4"]


def correlated_inputs(cols: int, n: int, seed: int) -> torch.Tensor:
    """Second moment of inputs with strongly correlated features (as a layer's activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    return x.t() @ x / n


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (q - w).double()
    return float((d @ h.double() * d).sum())


# (rows, cols): whole blocks per row, short rows several to a block (SpliceCore b at rank 8), and
# blocks straddling rows (96-wide rows in NF4's 64-blocks); every element count fills whole blocks
SHAPES = [(4, 64), (8, 96), (32, 8), (16, 16), (2, 128)]


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(CODEBOOK_FORMATS), shape=st.sampled_from(SHAPES), seed=st.integers(0, 10_000))
def test_on_the_grid_and_plain_rounding_when_the_covariance_is_diagonal(name, shape, seed):
    fmt = get_format(name)
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w.view(-1)[torch.randint(0, w.numel(), (3,), generator=g)] *= 8  # outliers set block scales
    # no correlation between inputs: nothing to feed back, so exactly plain rounding
    assert torch.equal(gptq_round(w, torch.diag(torch.rand(cols, generator=g) + 0.1), fmt), fmt.fake_quant(w))
    q = gptq_round(w, correlated_inputs(cols, 4 * cols, seed), fmt)
    # what the format encodes it to is itself: any later plain re-quantization keeps it bit for bit
    assert torch.equal(fmt.fake_quant(q), q)
    assert torch.equal(fmt.dequantize(fmt.quantize(q), q.shape), q)


@pytest.mark.parametrize("name", CODEBOOK_FORMATS)
@pytest.mark.parametrize("shape", [(64, 256), (256, 8), (128, 64)])
def test_lowers_the_output_error(name, shape):
    """GPTQ is greedy, so a small weight can come out worse than plain rounding; summed over a few
    realistic ones it must clearly win."""
    fmt = get_format(name)
    gptq = plain = 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(*shape, generator=g)
        h = correlated_inputs(shape[1], 4 * shape[1], seed)
        gptq += output_error(w, gptq_round(w, h, fmt), h)
        plain += output_error(w, fmt.fake_quant(w), h)
    assert gptq < 0.8 * plain


def test_matches_the_optimal_brain_surgeon_update():
    """Against the textbook OBS loop (explicit inverse, Schur complement after each column), with all
    block scales fixed up front (blocks span whole short rows), pinning each block's absmax weight."""
    fmt = get_format("rq4")
    rows, cols = 64, 8  # 4 rows per block: every block starts at column 0
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)).double()
    h = correlated_inputs(cols, 64, 4).double()
    h_damped = h + 0.01 * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    blocks = w.reshape(-1, fmt.block).float()
    d = fmt.block_scale(blocks)  # (n_blocks, 1)
    pinned = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, blocks.abs().argmax(1, keepdim=True), True)
    d_el, pinned = d.expand_as(blocks).reshape(rows, cols), pinned.reshape(rows, cols)
    hinv, work, ref = torch.linalg.inv(h_damped), w.clone(), torch.empty(rows, cols)
    for i in range(cols):
        col = work[:, i].float()
        target = torch.where(pinned[:, i], col.sign() * fmt.max_abs * d_el[:, i], col)
        q = fmt.codebook[fmt.nearest_codes(target, d_el[:, i]).long()] * d_el[:, i]
        ref[:, i] = q
        err = (work[:, i] - q.double()) / hinv[i, i]
        work[:, i + 1:] -= err.unsqueeze(1) * hinv[i, i + 1:].unsqueeze(0)
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]  # drop column i (Schur complement)
    assert torch.equal(gptq_round(w.float(), h, fmt), ref)


def test_bad_input_is_a_clear_error():
    fmt = get_format("rq4")
    with pytest.raises(QuantError, match="codebook formats"):
        gptq_round(torch.randn(4, 32), torch.eye(32), get_format("q8_0"))
    with pytest.raises(QuantError, match="2-D"):
        gptq_round(torch.randn(128), torch.eye(128), fmt)
    with pytest.raises(QuantError, match="not a positive multiple"):
        gptq_round(torch.randn(3, 10), torch.eye(10), fmt)
    with pytest.raises(QuantError, match="covariance of shape"):
        gptq_round(torch.randn(4, 32), torch.eye(16), fmt)
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        gptq_round(w, torch.eye(32), fmt)
    with pytest.raises(QuantError, match="positive definite"):
        gptq_round(torch.randn(4, 32), -torch.eye(32), fmt)


def scale_limit(fmt) -> float:
    """The largest block absmax the format's scale type can hold: max|codebook| times its largest value."""
    return torch.finfo(fmt.scale_dtype).max * fmt.max_abs


@pytest.mark.parametrize("name", ["rq4", "rq3"])  # nf4's fp32 scale holds any finite fp32 weight
def test_weights_too_large_for_the_scale_are_refused_as_quantize_refuses_them(name):
    fmt = get_format(name)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * scale_limit(fmt)
    with pytest.raises(QuantError, match="overflows the scale type"):
        fmt.quantize(w)
    with pytest.raises(QuantError, match=rf"GPTQ \({name}\): a block scale overflows the scale type"):
        gptq_round(w, torch.eye(64), fmt)


@pytest.mark.parametrize("name", CODEBOOK_FORMATS)
def test_feedback_past_the_scale_limit_is_an_error_not_inf(name):
    """Weights the format stores, but GPTQ moves rounding errors onto a block already at the limit."""
    fmt = get_format(name)
    b, limit = fmt.block, scale_limit(fmt)
    w = torch.empty(1, 2 * b)
    d = float(fmt.block_scale(torch.full((1, b), 0.97 * limit)))
    w[0, :b] = 0.999 * float(fmt.codebook[-1] + fmt.codebook[-2]) / 2 * d  # halfway between codes: large errors
    w[0, 0] = 0.97 * limit
    w[0, b:] = 0.9995 * limit
    h = torch.ones(2 * b, 2 * b) + 0.05 * torch.eye(2 * b)  # near-identical inputs: errors carry on to later columns
    assert torch.isfinite(fmt.dequantize(fmt.quantize(w), w.shape)).all()  # plain rounding stores it
    with pytest.raises(QuantError, match=rf"GPTQ \({name}\): error feedback pushed a block past"):
        gptq_round(w, h, fmt)
