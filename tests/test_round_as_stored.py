"""Rounding a tensor to what its encoding stores, refusing finite values the stored form cannot hold."""

from __future__ import annotations

import pytest
import torch

from felix.config import ModelConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.quant_formats import FORMATS, QuantError
from felix.quantize import fake_quantize_model, round_as_stored
from felix.splice_quant import _gptq_or_plain, requantize_splice

A1 = "layers.1.mlp.splice.a"


def _with_nan_and(value: float, shape: tuple[int, int]) -> torch.Tensor:
    """Random weights holding a NaN in the first block and a finite `value` in a later one."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t[0, 0], t[-1, -1] = float("nan"), value
    return t


def test_round_as_stored_rounds_as_each_encoding_stores():
    t = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(round_as_stored("w", t, "rq4"), FORMATS["rq4"].fake_quant(t))
    assert torch.equal(round_as_stored("w", t, "f16"), t.half().float())
    assert torch.equal(round_as_stored("w", t.double(), "f32"), t)
    assert round_as_stored("w", t.double(), "f16").dtype == torch.float64
    nan = t.clone()
    nan[0, 0] = float("nan")  # NaN/inf are the caller's to see (a NaN loss), never an error here
    assert round_as_stored("w", nan, "f16")[0, 0].isnan() and round_as_stored("w", nan, "rq4")[0].isnan().any()


@pytest.mark.parametrize(("enc", "value", "message"), [
    ("rq4", 1e7, r"tensor w: rq4: a block scale overflows the scale type \(\|weight\| up to 1e\+07\)"),
    ("f16", 1e5, r"tensor w: \|value\| up to 1e\+05 overflows f16 \(the type this tensor is stored in, range ±65504\)"),
    ("f32", 1e39, r"tensor w: \|value\| up to 1e\+39 overflows f32"),
])
def test_round_as_stored_names_the_tensor_and_encoding_that_overflow(enc, value, message):
    t = torch.randn(4, 64, dtype=torch.float64)
    t[2, 3] = value
    with pytest.raises(QuantError, match=message) as err:
        round_as_stored("w", t, enc)
    assert isinstance(err.value, FelixError)  # what the servers and the CLI catch


@pytest.mark.parametrize(("shape", "value", "enc"), [((32, 64), 1e7, "rq4"), ((4, 64), 1e6, "f16")])
def test_requantize_splice_refuses_an_overflow_beside_a_nan(shape, value, enc):
    """Before, one NaN anywhere in the tensor switched the overflow check off: the finite 1e7 came back inf."""
    with pytest.raises(FelixError, match=rf"tensor {A1}: .*overflows"):
        out = requantize_splice(A1, _with_nan_and(value, shape), "rq4")
        pytest.fail(f"not refused; the finite value came back {float(out[-1, -1])} ({enc})")


def test_fake_quantize_model_refuses_an_fp16_overflow_beside_a_nan():
    """The kept fp16 embedding: before, a NaN elsewhere in it let 1e5 through as inf, while a block format's
    strict check (per block) refused the same overflow."""
    torch.manual_seed(0)
    model = FelixLM(ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=16,
                                splice_every=2, splice_rank=4)).eval()
    with torch.no_grad():
        model.tok_emb.weight[0, 0], model.tok_emb.weight[5, 5] = float("nan"), 1e5
    with pytest.raises(FelixError, match=r"tensor tok_emb\.weight: \|value\| up to 1e\+05 overflows f16"):
        fake_quantize_model(model, "rq4", "keep")


def test_gptq_rounding_of_a_splice_tensor_names_it_when_it_overflows():
    """GPTQ refuses an overflowing block scale itself (no inf weights to check for after it); the error now
    names the tensor, as the plain rounding's does."""
    w = torch.randn(32, 64, dtype=torch.float64)
    w[3, 5] = 1e7
    with pytest.raises(QuantError, match=rf"tensor {A1}: GPTQ \(rq4\): a block scale overflows"):
        _gptq_or_plain(A1, w, torch.eye(64, dtype=torch.float64), "rq4", 0.01)
