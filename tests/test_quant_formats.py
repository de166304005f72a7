"""Block formats: codebooks, byte layouts, bit-exactness with gguf, nearest-centroid, STE."""

from __future__ import annotations

import multiprocessing
import os
import threading

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.errors import FelixError
from felix.quant_formats import FORMATS, QuantError, _map_chunks, beta_codebook, get_format, nf4_codebook

BRIEF_RQ4 = [0.00492, 0.01488, 0.02524, 0.03634, 0.04873, 0.06343, 0.08297, 0.12282]
# bitsandbytes.functional's NF4 table (get_4bit_type("nf4")), the values the construction must give
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]
GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights like a trained LLM's: Student-t(3) bulk, a few large outliers, an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    w = t.sample((rows, cols)) * 0.02
    idx = torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)
    w.view(-1)[idx] *= 25
    w[0] = 0.0
    return w


# -- codebooks ---------------------------------------------------------------------------------
def test_rq4_codebook_is_the_briefs_to_1e5():
    cb = np.array(beta_codebook(16))
    # the brief prints 5 decimals, so rounding alone is up to 5e-6: 1e-5 holds with room to spare
    np.testing.assert_allclose(cb[8:], BRIEF_RQ4, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cb[:8], -cb[8:][::-1], atol=1e-12)
    assert np.all(np.diff(cb) > 0)
    assert list(FORMATS["rq4"].codebook) == pytest.approx(list(cb), abs=1e-7)


def test_beta_codebook_agrees_with_mpmath_incomplete_beta():
    """Independent check: edges by bisection on mpmath's regularized incomplete beta, bin means from
    x·Beta(a, a) = ½·Beta(a+1, a)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 25
    a = mpmath.mpf(127.5)
    n = 8

    def cdf(x, first):
        return mpmath.betainc(first, a, 0, x, regularized=True)

    edges = [mpmath.mpf(0)]
    for k in range(1, n):
        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        for _ in range(45):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid, a) < mpmath.mpf(k) / n else (lo, mid)
        edges.append((lo + hi) / 2)
    edges.append(mpmath.mpf(1))
    ref = [float(2 * (n * (cdf(edges[k + 1], a + 1) - cdf(edges[k], a + 1)) / 2) - 1) for k in range(n)]
    np.testing.assert_allclose(beta_codebook(n), ref, atol=1e-8, rtol=0)


def test_nf4_codebook_is_bitsandbytes():
    np.testing.assert_allclose(nf4_codebook(), BNB_NF4, atol=1e-7, rtol=0)


def test_sizes_and_bits_per_weight():
    expected = {"rq4": (32, 18, 4.5), "rq3": (32, 14, 3.5), "nf4": (64, 36, 4.5), "q8_0": (32, 34, 8.5),
                "q4_0": (32, 18, 4.5)}
    x = torch.randn(8, 256)
    for name, (block, nbytes, bpw) in expected.items():
        f = FORMATS[name]
        assert (f.block, f.block_bytes, f.bits_per_weight) == (block, nbytes, bpw)
        packed = f.quantize(x)
        assert packed.dtype == torch.uint8 and packed.shape == (x.numel() // block * nbytes,) == (f.nbytes(x.numel()),)


# -- byte layouts ------------------------------------------------------------------------------
def test_rq4_block_layout_is_the_briefs():
    f = FORMATS["rq4"]
    cb = f.codebook
    idx = torch.tensor([1, 2, 15, 0, 7, 8] + [3] * 26)  # contains code 15: absmax is c15·d, so d is exact
    d = 0.5
    packed = f.quantize(cb[idx] * d)
    assert packed.numel() == 18
    assert packed[:2].numpy().tobytes() == np.float16(d).tobytes()  # fp16 scale, little-endian
    assert packed[2] == 0x21 and packed[3] == 0x0F and packed[4] == 0x87  # byte j = idx[2j] | idx[2j+1] << 4
    body = packed[2:].numpy()
    np.testing.assert_array_equal(body, (idx[0::2] | (idx[1::2] << 4)).numpy().astype(np.uint8))


def test_rq3_and_nf4_layouts():
    rq3 = FORMATS["rq3"]
    idx = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0] * 4)
    packed = rq3.quantize(rq3.codebook[idx] * 2.0)
    word = sum(int(i) << (3 * k) for k, i in enumerate(idx[:8]))
    assert packed.numel() == 14 and list(packed[2:5]) == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    bits = int.from_bytes(packed[2:].numpy().tobytes(), "little")  # one 96-bit LSB-first stream
    assert [(bits >> (3 * k)) & 7 for k in range(32)] == idx.tolist()
    nf4 = FORMATS["nf4"]
    idx = torch.arange(64) % 16
    packed = nf4.quantize(nf4.codebook[idx] * 3.0)
    assert packed[:4].numpy().tobytes() == np.float32(3.0).tobytes()
    assert packed[4] == (0 << 4 | 1) and packed[5] == (2 << 4 | 3)  # bitsandbytes: first code in the high nibble


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["rq4", "rq3", "nf4", "q4_0", "q8_0"]), st.integers(1, 6), st.data())
def test_pack_unpack_round_trip(name, n_blocks, data):
    f = FORMATS[name]
    levels = 256 if name == "q8_0" else len(getattr(f, "codebook", range(16)))
    codes = torch.tensor(data.draw(st.lists(st.integers(0, levels - 1), min_size=n_blocks * f.block,
                                            max_size=n_blocks * f.block)), dtype=torch.uint8).reshape(n_blocks, -1)
    # positive normal fp16 bit patterns: scales every format stores exactly
    bits = data.draw(st.lists(st.integers(0x0400, 0x7BFF), min_size=n_blocks, max_size=n_blocks))
    scale = torch.from_numpy(np.array(bits, dtype=np.uint16).view(np.float16).astype(np.float32))[:, None]
    packed = f._pack(scale, codes)
    assert packed.shape == (n_blocks, f.block_bytes)
    s2, c2 = f._unpack(packed)
    assert torch.equal(s2, scale) and torch.equal(c2, codes)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(list(FORMATS)), st.integers(1, 4), st.integers(1, 3),
       st.floats(1e-3, 1e2), st.integers(0, 2**31 - 1))
def test_quantize_dequantize_equals_fake_quant(name, rows, blocks_per_row, scale, seed):
    f = FORMATS[name]
    x = torch.randn(rows, blocks_per_row * f.block, generator=torch.Generator().manual_seed(seed)) * scale
    packed = f.quantize(x)
    back = f.dequantize(packed, x.shape)
    assert back.shape == x.shape and back.dtype == torch.float32
    assert torch.equal(back, f.fake_quant(x))
    assert torch.equal(f.dequantize(packed.numpy().tobytes(), x.shape), back)
    # the worst error is half the widest gap between neighbouring levels, times the block scale
    assert (back - x).abs().max() <= x.abs().max() * 0.6


# -- gguf bit-exactness ------------------------------------------------------------------------
def _gguf_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    ties = np.zeros((2, 32), dtype=np.float32)
    ties[0, :4] = [127.0, 0.5, -1.5, 2.5]  # q8_0: x·(1/d) lands exactly on .5: ggml rounds away from zero
    ties[1, :3] = [-3.0, 3.0, 1.0]  # q4_0: equal magnitudes, the first one's sign sets d
    return [
        rng.standard_normal((64, 256)).astype(np.float32) * 0.02,
        heavy_tailed(128, 512, seed=1).numpy(),
        (rng.standard_normal((4, 64)) * 1e-6).astype(np.float32),
        rng.uniform(-300, 300, (4, 96)).astype(np.float32),
        ties,
    ]


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_ggml_formats_are_bit_exact_with_gguf(name):
    f, qtype = FORMATS[name], GGUF_TYPES[name]
    for arr in _gguf_cases():
        ours = f.quantize(torch.from_numpy(arr)).numpy()
        ref = gguf.quants.quantize(arr, qtype)
        np.testing.assert_array_equal(ours, ref.reshape(-1))
        np.testing.assert_array_equal(f.dequantize(ours, arr.shape).numpy(), gguf.quants.dequantize(ref, qtype))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["q8_0", "q4_0"]),
       st.lists(st.floats(-1e3, 1e3, width=32, allow_subnormal=False), min_size=64, max_size=64))
def test_ggml_formats_match_gguf_on_arbitrary_values(name, values):
    arr = np.array(values, dtype=np.float32).reshape(2, 32)
    ref = gguf.quants.quantize(arr, GGUF_TYPES[name])
    np.testing.assert_array_equal(FORMATS[name].quantize(torch.from_numpy(arr)).numpy(), ref.reshape(-1))


# -- nearest centroid --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rq4", "rq3", "nf4"])
def test_each_weight_takes_the_nearest_centroid(name):
    f = FORMATS[name]
    x = heavy_tailed(64, 256, seed=2)
    packed = f.quantize(x).reshape(-1, f.block_bytes)
    back = f.dequantize(packed, x.shape).reshape(-1, f.block)
    d, _ = f._unpack(packed)  # the stored scales
    blocks = x.reshape(-1, f.block)
    candidates = f.codebook[None, None, :] * d[:, :, None]  # (n, 1, levels)
    best = (blocks[:, :, None] - candidates).abs().min(-1).values
    err = (blocks - back).abs()
    assert torch.all(err <= best + 1e-6 * d)
    assert torch.all((back[:, :, None] == candidates).any(-1))  # every value is some centroid·d
    # the scale is absmax / max|centroid| rounded to the scale dtype
    want = (blocks.abs().amax(1, keepdim=True) / f.codebook.abs().max()).to(f.scale_dtype).float()
    assert torch.equal(d, want)


def test_chunked_quantize_changes_no_byte():
    x = heavy_tailed(16, 512, seed=3)
    for f in FORMATS.values():
        assert torch.equal(f.quantize(x, chunk=f.block * 7), f.quantize(x)), f.name



@pytest.fixture
def two_intra_op_threads():
    """The process at 2 intra-op threads (the pool path needs more than one), restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _first_torch_call_in_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_chunk_threads_leave_other_threads_their_intra_op_count(two_intra_op_threads):
    """torch's count is per thread, taken at a thread's first torch call from the last one set: a thread
    starting while chunks run (a server request during a re-quantization) must not be stuck at 1."""
    seen: dict[str, set[int]] = {"chunk": set(), "new thread": set()}

    def work(start: int) -> None:
        seen["chunk"].add(torch.get_num_threads())
        seen["new thread"].add(_first_torch_call_in_a_new_thread())

    _map_chunks(work, range(4), torch.device("cpu"))
    assert seen == {"chunk": {1}, "new thread": {2}}
    assert torch.get_num_threads() == 2 and _first_torch_call_in_a_new_thread() == 2


def test_concurrent_quantizations_leave_every_thread_its_intra_op_count(two_intra_op_threads):
    """Threads quantizing at once (a server re-quantizing while a request runs), two of them making
    their first torch call while another quantizes: every one keeps the process's count."""
    fmt, x = FORMATS["rq4"], torch.randn(64 * 1024)
    counts = {}

    def quantize_loop(name: str) -> None:
        for _ in range(20):
            fmt.quantize(x, chunk=4096)  # 16 chunks: the threaded path
        counts[name] = torch.get_num_threads()

    fmt.quantize(x, chunk=4096)
    threads = [threading.Thread(target=quantize_loop, args=(name,)) for name in "ABC"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == {"A": 2, "B": 2, "C": 2}
    assert torch.get_num_threads() == 2 and _first_torch_call_in_a_new_thread() == 2

def _quantize_in_child(queue) -> None:
    queue.put(FORMATS["rq4"].quantize(torch.randn(1 << 16), chunk=4096).numel())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_quantizes_without_the_parents_chunk_threads(two_intra_op_threads):
    FORMATS["rq4"].quantize(torch.randn(1 << 16), chunk=4096)  # the parent's chunk threads exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_quantize_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == (1 << 16) // 32 * 18
    finally:
        child.kill()
        child.join()

def test_the_first_failing_chunks_error_is_raised(two_intra_op_threads):
    def work(start: int) -> None:
        if start >= 2:
            raise ValueError(f"chunk {start}")

    with pytest.raises(ValueError, match="chunk 2"):
        _map_chunks(work, range(6), torch.device("cpu"))
    assert torch.get_num_threads() == 2

# -- errors ------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    f = FORMATS["rq4"]
    x = torch.randn(4, 64)
    x[3, 50] = float("nan")
    with pytest.raises(QuantError, match="NaN or inf"):
        f.quantize(x, chunk=64)  # found in the last chunk
    x[3, 50] = float("-inf")
    with pytest.raises(QuantError, match="NaN or inf"):
        f.quantize(x)
    with pytest.raises(QuantError, match="48 elements, not a positive multiple of the rq4 block size 32"):
        f.quantize(torch.randn(2, 24))
    with pytest.raises(QuantError, match="expected 36 uint8 bytes"):
        f.dequantize(torch.zeros(35, dtype=torch.uint8), (2, 32))
    with pytest.raises(QuantError, match="overflows"):
        f.quantize(torch.full((32,), 1e5))
    with pytest.raises(FelixError, match="unknown quantization format 'q3_k'.*rq4, rq3, nf4, q8_0, q4_0"):
        get_format("q3_k")


# -- straight-through estimator ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ste_forward_is_quantized_and_gradient_is_identity(name, dtype):
    f = FORMATS[name]
    x = (torch.randn(3, 128) * 0.05).to(dtype).requires_grad_()
    upstream = torch.randn(3, 128).to(dtype)
    y = f.fake_quant_ste(x)
    assert torch.equal(y.detach(), f.fake_quant(x.detach())) and y.dtype == dtype
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    assert not f.fake_quant(x).requires_grad  # the plain path carries no gradient
