"""Block quantization formats for deployment: RQ4/RQ3 (BetaQ), NF4, and llama.cpp's Q8_0/Q4_0.

Every format cuts a tensor, flattened in row-major order, into blocks of `block` weights and stores
each block as `block_bytes` bytes: a scale followed by the packed codes (ggml's block-struct layout).
Row-major flat blocks are exactly llama.cpp's per-row blocks whenever the row length is a multiple of
the block. Flat blocking is what lets SpliceCore `b` (d_model x rank 8: rows shorter than a block) be
quantized as the brief asks; a tensor whose *element count* is not a multiple of the block is
rejected with a QuantError. No padding: padded bytes would not be llama.cpp's layout and would skew
the size accounting.

    format  block  bytes/block  bits/weight  scale            codes
    rq4     32     18           4.5          fp16 absmax/c15  16 BetaQ centroids, byte j = i[2j] | i[2j+1] << 4
    rq3     32     14           3.5          fp16 absmax/c7   8 BetaQ centroids, 3-bit LSB-first bitstream
    nf4     64     36           4.5          fp32 absmax      16 NF4 values, byte j = i[2j] << 4 | i[2j+1] (bnb)
    q8_0    32     34           8.5          fp16 amax/127    int8, bit-exact with gguf.quants
    q4_0    32     18           4.5          fp16 max/-8      0..15, byte j = q[j] | q[j+16] << 4 (gguf.quants)

RQ3 packing: each group of 8 codes is one 24-bit little-endian integer sum(i[k] << 3k), written as 3
bytes, so 32 codes take 12 bytes and bit 3k of the block's 96-bit little-endian stream starts code k.
NF4's scale is fp32 as in bitsandbytes without double quantization (4 bytes + 32 bytes per 64 weights).

Each format offers `quantize(x) -> 1-D uint8 tensor`, `dequantize(packed, shape) -> fp32 tensor`,
`fake_quant(x)` (quantize-dequantize in memory, equal to dequantize(quantize(x)) bit for bit, no
gradient; `strict=True` refuses a block scale overflow as `quantize` does) and `fake_quant_ste(x)` (the
same forward, not strict, identity gradient: quantization-aware training).
Everything is vectorized over blocks in torch, so it runs on whatever device the tensor lives on.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from felix.errors import FelixError

CHUNK = 1 << 20  # elements per step of `quantize` (4 MB of fp32)


class QuantError(FelixError, ValueError):
    """A tensor a format cannot encode (shape, NaN/inf, scale overflow) or bytes it cannot decode."""


# -- codebooks ---------------------------------------------------------------------------------
@functools.cache
def beta_codebook(n: int, a: float = 127.5, grid: int = 1 << 18) -> tuple[float, ...]:
    """BetaQ centroids: conditional means of `n` equal-probability bins of Beta(a, a), mapped to [-1, 1].

    Computed by integrating the pdf (log-space via lgamma, float64, trapezoid) on a grid spanning
    ±20 standard deviations; the CDF gives the bin edges and the cumulative integral of x·pdf the
    means. Grid 2^18 agrees with 2^22 to 1e-8, far inside the brief's 5-decimal values.
    """
    sd = math.sqrt(a * a / ((2 * a) ** 2 * (2 * a + 1)))
    lo, hi = max(0.0, 0.5 - 20 * sd), min(1.0, 0.5 + 20 * sd)
    x = np.linspace(lo, hi, grid + 1)
    log_norm = math.lgamma(2 * a) - 2 * math.lgamma(a)
    with np.errstate(divide="ignore"):
        pdf = np.exp(log_norm + (a - 1) * (np.log(x) + np.log1p(-x)))
    h = x[1] - x[0]

    def cumulative(f: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * (h / 2))])

    cdf, first_moment = cumulative(pdf), cumulative(x * pdf)
    cdf /= cdf[-1]
    edges = np.interp(np.arange(n + 1) / n, cdf, x)
    means = np.diff(np.interp(edges, x, first_moment)) * n
    return tuple(float(v) for v in 2 * means - 1)


@functools.cache
def nf4_codebook() -> tuple[float, ...]:
    """bitsandbytes' NF4: normal quantiles, 8 positive and 7 negative plus 0, scaled to [-1, 1].

    Same construction as `bitsandbytes.functional.create_normal_map(0.9677083, use_extra_value=True)`:
    float32 linspace of probabilities, float64 quantiles (torch's ndtri for scipy's norm.ppf), float32.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return tuple(float(v) for v in values / values.max())


# -- the format interface -----------------------------------------------------------------------
class QuantFormat(ABC):
    """A block format. Subclasses define `_encode`, `_decode`, `_pack`, `_unpack` on (n, block) blocks."""

    name: str
    block: int
    block_bytes: int
    ggml_type: int | None = None  # ggml type id (RQ4/RQ3: the fork's 42/43), None where there is none

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    def nbytes(self, numel: int) -> int:
        """Packed bytes of a tensor of `numel` elements."""
        self.check_numel(numel)
        return numel // self.block * self.block_bytes

    def check_numel(self, numel: int, what: str = "tensor") -> None:
        if numel <= 0 or numel % self.block:
            raise QuantError(f"{what} has {numel} elements, not a positive multiple of the {self.name} "
                             f"block size {self.block}")

    # scale (n, 1) fp32 holding the stored value exactly; codes (n, block) uint8
    @abstractmethod
    def _encode(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @abstractmethod
    def _decode(self, scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @abstractmethod
    def _pack(self, scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @abstractmethod
    def _unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        self.check_numel(x.numel(), f"tensor of shape {list(x.shape)}")
        if not x.is_floating_point():
            raise QuantError(f"{self.name}: cannot quantize a {x.dtype} tensor")
        return x.detach().reshape(-1, self.block).float()

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
        """The packed bytes (1-D uint8, on x's device; `.cpu().numpy().tobytes()` for raw bytes).

        Works through `chunk` elements at a time: each step's temporaries stay in cache, and peak
        memory stays at the input plus its packed bytes (the encoding is per block, so chunking
        changes no byte)."""
        blocks = self._blocks(x)
        out = torch.empty(blocks.shape[0], self.block_bytes, dtype=torch.uint8, device=blocks.device)
        step = max(1, chunk // self.block)

        def work(start: int) -> None:
            part = blocks[start : start + step]
            scale, codes = self._encode(part)
            # a NaN or inf weight makes its block's scale NaN/inf (amax propagates both): one check for all
            if not torch.isfinite(scale).all():
                if not torch.isfinite(part).all():
                    raise QuantError(f"{self.name}: tensor of shape {list(x.shape)} contains NaN or inf")
                raise self._overflow(part)
            out[start : start + step] = self._pack(scale, codes)

        _map_chunks(work, range(0, blocks.shape[0], step), blocks.device)
        return out.reshape(-1)

    @torch.no_grad()
    def dequantize(self, packed: torch.Tensor | np.ndarray | bytes,
                   shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """fp32 tensor of `shape` from packed bytes (uint8 torch tensor or numpy array of any shape, or bytes)."""
        if isinstance(packed, (bytes, bytearray, memoryview)):
            packed = np.frombuffer(packed, dtype=np.uint8)
        if isinstance(packed, np.ndarray):
            packed = torch.from_numpy(np.require(packed, requirements=["C", "W"]))  # copies read-only arrays
        if any(s < 0 for s in shape):  # (-2, -64) multiplies to a valid count, then fails to reshape
            raise QuantError(f"{self.name}: cannot dequantize to shape {list(shape)}: negative dimension")
        numel = math.prod(shape)
        if packed.dtype != torch.uint8 or packed.numel() != self.nbytes(numel):
            raise QuantError(f"{self.name}: {packed.numel()} {packed.dtype} values for shape {list(shape)}, "
                             f"expected {self.nbytes(numel)} uint8 bytes")
        scale, codes = self._unpack(packed.reshape(-1, self.block_bytes))
        return self._decode(scale, codes).reshape(shape)

    @torch.no_grad()
    def fake_quant(self, x: torch.Tensor, strict: bool = False) -> torch.Tensor:
        """dequantize(quantize(x)) in x's dtype, without packing (exactly equal in fp32).

        `strict`: finite weights whose block scale overflows the scale type are a QuantError, as `quantize`
        says, instead of inf/NaN weights (one reduction over the scales). NaN/inf weights stay NaN/inf either
        way, as they would unquantized: the trainer's bad-step handling sees them. `felix.quantize.round_as_stored`
        is the strict form that also names the tensor."""
        blocks = self._blocks(x)
        scale, codes = self._encode(blocks)
        if strict and not torch.isfinite(scale).all():
            overflowed = blocks[~torch.isfinite(scale).flatten() & torch.isfinite(blocks).all(dim=1)]
            if overflowed.numel():
                raise self._overflow(overflowed)
        return self._decode(scale, codes).reshape(x.shape).to(x.dtype)

    def fake_quant_ste(self, x: torch.Tensor) -> torch.Tensor:
        """Straight-through fake quantization: forward is exactly `fake_quant(x)` (also in bf16, unlike
        `x + (q - x).detach()`), the gradient is the identity. Not strict: the check would stop a GPU for every
        weight of every training step (and break a compiled graph), while an overflow there only ever shows as
        a non-finite step, which the trainer skips, rolls back and explains (`felix.quail.fake_quant_failure`)."""
        return _StraightThrough.apply(x, self)

    def _overflow(self, blocks: torch.Tensor) -> QuantError:
        return QuantError(f"{self.name}: a block scale overflows the scale type (|weight| up to "
                          f"{float(blocks.abs().max()):.4g})")

    def __repr__(self) -> str:
        return f"<{self.name}: {self.block} weights in {self.block_bytes} bytes, {self.bits_per_weight} bits/weight>"


def _map_chunks(work, starts: range, device: torch.device) -> None:
    """Run `work(start)` for every chunk; re-raise the first chunk's error. On the CPU, chunks go to
    torch.get_num_threads() Python threads at one intra-op thread each: torch releases the GIL, so the
    cores work on separate chunks instead of meeting at a barrier after every small elementwise op,
    which on a machine with busy cores costs more than the op itself (felix-300m rq4: 63 s with 2
    intra-op threads vs 19 s with one, measured while other jobs ran)."""
    count = torch.get_num_threads() if device.type == "cpu" else 1
    if count <= 1 or len(starts) <= 1:  # a chunk thread itself (count 1) never waits on the pool
        for start in starts:
            work(start)
        return
    list(_chunk_pool(count).map(work, starts))  # re-raises the first chunk's error


# torch's intra-op thread count is per thread, and a thread takes the default at its first torch call;
# set_num_threads sets the calling thread's count *and* that default. Lowering it around every call
# would leave a thread started meanwhile (a server's request thread) at 1 for good, so the chunk
# threads are started once per process (per count) and the default is put back as soon as they have
# taken their 1.
_chunk_pools: dict[int, ThreadPoolExecutor] = {}
_chunk_pools_lock = threading.Lock()


def _chunk_pool(n_threads: int) -> ThreadPoolExecutor:
    """`n_threads` threads at one intra-op thread each, made on first use."""
    with _chunk_pools_lock:
        if (pool := _chunk_pools.get(n_threads)) is not None:
            return pool
        started = threading.Barrier(n_threads + 1)

        def single_threaded() -> None:
            try:
                torch.get_num_threads()  # first: a thread's first torch call resets its count to the default
                torch.set_num_threads(1)
            finally:
                started.wait()

        pool = ThreadPoolExecutor(n_threads, thread_name_prefix="quantize-chunks", initializer=single_threaded)
        try:
            for _ in range(n_threads):  # no worker is idle before the barrier: each task starts a new one
                pool.submit(lambda: None)
            started.wait()
        except BaseException:
            started.abort()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            torch.set_num_threads(n_threads)  # the default back: the caller's count (it never left it)
        _chunk_pools[n_threads] = pool
        return pool


def _forget_chunk_pools() -> None:
    """In a forked child: the pools' threads stayed in the parent."""
    global _chunk_pools_lock
    _chunk_pools.clear()
    _chunk_pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_chunk_pools)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        return fmt.fake_quant(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _scale_bytes(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 1) fp32 scales -> (n, itemsize) little-endian bytes of `dtype`."""
    return scale.to(dtype).contiguous().view(torch.uint8)


def _scale_from_bytes(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return raw.contiguous().view(dtype).float()


# -- codebook formats (RQ4, RQ3, NF4) -----------------------------------------------------------
class CodebookFormat(QuantFormat):
    """Scale d = absmax / max|codebook| (rounded to the scale dtype); each weight takes the nearest
    codebook value times d. Nearness is judged against the *stored* d, so every dequantized weight
    is the closest of the 2^bits values the deployment kernel can produce."""

    def __init__(self, name: str, codebook: tuple[float, ...], block: int, scale_dtype: torch.dtype,
                 packing: str, ggml_type: int | None = None):
        self.name, self.block, self.scale_dtype, self.packing = name, block, scale_dtype, packing
        self.ggml_type = ggml_type
        self.codebook = torch.tensor(codebook, dtype=torch.float32)
        self.bits = {"lo_first": 4, "hi_first": 4, "bits3": 3}[packing]
        if len(codebook) != 2**self.bits or block % 8:
            raise ValueError(f"{name}: {len(codebook)} values in blocks of {block} do not fit {packing} packing")
        self.block_bytes = torch.finfo(scale_dtype).bits // 8 + block * self.bits // 8
        self.max_abs = float(self.codebook.abs().max())
        self._mids_list = ((self.codebook[1:] + self.codebook[:-1]) / 2).tolist()  # fp32 midpoints
        # |weight| / d must exceed this for a weight of either sign to take an extreme code
        self._extreme_mid = max(self._mids_list[-1], -self._mids_list[0])
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """The codebook on `device`, cached."""
        if device not in self._tables:
            self._tables[device] = self.codebook.to(device)
        return self._tables[device]

    def block_scale(self, blocks: torch.Tensor) -> torch.Tensor:
        """The stored scale d (n, 1) of (n, block) weights: absmax / max|codebook|, rounded to the scale dtype.

        Where that rounding goes up so far (fp16 subnormals: absmax below ~1.3e-8 for RQ4) that the absmax
        weight would take a lesser code, d is the next value down instead. Otherwise the dequantized block's
        absmax is no longer max|codebook|·d and re-quantizing it (GPTQ-rounded SpliceCore at packing, a fold,
        a server's push) derives another scale and moves every weight of the block."""
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        d = (absmax / self.max_abs).to(self.scale_dtype)
        # 0/0 and x/inf (overflow, which quantize must still refuse) compare False: kept as they are
        short = (absmax / d.float() <= self._extreme_mid) & torch.isfinite(d)
        return torch.where(short, torch.nextafter(d, torch.zeros_like(d)), d).float()

    def nearest_codes(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The code of the nearest grid value c·d to each weight of x, for scales d broadcast against x."""
        # all-zero blocks have d = 0: divide by 1 instead, every code then decodes to 0·c = 0
        ratio = x / torch.where(d > 0, d, torch.ones_like(d))
        # nearest centroid = how many midpoints lie below (a tie goes to the lower centroid); counted
        # with one compare-and-add per midpoint, ~3x faster on the CPU than torch.bucketize
        codes = torch.zeros(ratio.shape, dtype=torch.uint8, device=ratio.device)
        above = torch.empty(ratio.shape, dtype=torch.bool, device=ratio.device)
        for m in self._mids_list:
            codes += torch.gt(ratio, m, out=above)
        return codes

    def _encode(self, blocks):
        d = self.block_scale(blocks)
        return d, self.nearest_codes(blocks, d)

    def _decode(self, scale, codes):
        return self._table(codes.device)[codes.long()] * scale

    def _pack(self, scale, codes):
        if self.packing == "lo_first":  # RQ4, the brief: byte j = idx[2j] | idx[2j+1] << 4
            body = codes[:, 0::2] | (codes[:, 1::2] << 4)
        elif self.packing == "hi_first":  # bitsandbytes NF4: first code in the high nibble
            body = (codes[:, 0::2] << 4) | codes[:, 1::2]
        else:  # "bits3": 8 codes -> one 24-bit little-endian integer -> 3 bytes
            groups = codes.reshape(codes.shape[0], -1, 8).int()
            word = (groups << torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)).sum(-1)
            body = torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], -1).to(torch.uint8)
            body = body.reshape(codes.shape[0], -1)
        return torch.cat([_scale_bytes(scale, self.scale_dtype), body], dim=1)

    def _unpack(self, packed):
        k = torch.finfo(self.scale_dtype).bits // 8
        scale, body = _scale_from_bytes(packed[:, :k], self.scale_dtype), packed[:, k:]
        if self.packing == "bits3":
            b = body.reshape(body.shape[0], -1, 3).int()
            word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
            shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
            codes = ((word[..., None] >> shifts) & 7).reshape(body.shape[0], -1)
        else:
            lo, hi = body & 0x0F, body >> 4
            first, second = (lo, hi) if self.packing == "lo_first" else (hi, lo)
            codes = torch.stack([first, second], -1).reshape(body.shape[0], -1)
        return scale, codes.to(torch.uint8)


# -- llama.cpp formats, bit-exact with gguf.quants ----------------------------------------------
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """gguf's `np_roundf` (ggml's roundf) with the same fp32 operations, so ties round identically."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, 0 where d is 0 (as gguf's np.where(d == 0, 0, 1 / d)); a true fp32 division like numpy's."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


class Q8_0(QuantFormat):
    name, block, block_bytes, ggml_type = "q8_0", 32, 34, 8

    def _encode(self, blocks):
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        codes = _round_half_away(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
        return d.half().float(), codes  # ggml encodes with the fp32 d and stores it as fp16

    def _decode(self, scale, codes):
        return codes.view(torch.int8).float() * scale

    def _pack(self, scale, codes):
        return torch.cat([_scale_bytes(scale, torch.float16), codes], dim=1)

    def _unpack(self, packed):
        return _scale_from_bytes(packed[:, :2], torch.float16), packed[:, 2:].contiguous()


class Q4_0(QuantFormat):
    name, block, block_bytes, ggml_type = "q4_0", 32, 18, 2

    def _encode(self, blocks):
        # d carries the sign of the largest-magnitude weight (the first one on ties, as numpy's argmax)
        peak = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
        d = peak / -8
        codes = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        return d.half().float(), codes

    def _decode(self, scale, codes):
        return (codes.float() - 8) * scale

    def _pack(self, scale, codes):
        return torch.cat([_scale_bytes(scale, torch.float16), codes[:, :16] | (codes[:, 16:] << 4)], dim=1)

    def _unpack(self, packed):
        body = packed[:, 2:]
        return _scale_from_bytes(packed[:, :2], torch.float16), torch.cat([body & 0x0F, body >> 4], dim=1)


FORMATS: dict[str, QuantFormat] = {
    "rq4": CodebookFormat("rq4", beta_codebook(16), 32, torch.float16, "lo_first", ggml_type=42),
    "rq3": CodebookFormat("rq3", beta_codebook(8), 32, torch.float16, "bits3", ggml_type=43),
    "nf4": CodebookFormat("nf4", nf4_codebook(), 64, torch.float32, "hi_first"),
    "q8_0": Q8_0(),
    "q4_0": Q4_0(),
}


def get_format(name: str) -> QuantFormat:
    """The format called `name`, or a FelixError listing the known ones."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise FelixError(f"unknown quantization format {name!r} (known: {', '.join(FORMATS)})")
    return fmt
