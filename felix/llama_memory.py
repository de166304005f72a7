"""What llama.cpp allocates to run a model of a given config, besides its weights: the KV cache (its context
padded as llama.cpp pads it), the compute buffer of the graph it reserves, and the logits it hands back.

Measured against llama-cpp-python 0.3.36's own figures (tests/test_export_memory.py). `felix quantize` and
`felix export` add these to the weights for the deployment memory they report against the 4 GiB cap.
"""

from __future__ import annotations

from felix.config import ModelConfig
from felix.errors import FelixError

KV_CONTEXT = 2048  # deployment context the KV cache is budgeted for, unless a caller names another
VRAM_CAP_BYTES = 4 * 2**30  # "deploys under 4 GB of VRAM" (brief §1), read as 4 GiB
# llama.cpp rounds the context (-c / n_ctx) up to a multiple of 256 cells and sizes the KV cache for that
# (ggml-org/llama.cpp#17046; llama-cpp-python 0.3.36 turns n_ctx 1000 into 1024)
KV_CELL_PAD = 256
N_UBATCH = 512  # tokens llama.cpp computes at once (-ub / n_ubatch; its default): sizes its compute buffer
F32 = 4


def kv_cells(context: int) -> int:
    """The KV cache cells llama.cpp allocates for a context of `context` positions: padded to KV_CELL_PAD."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise FelixError(f"the KV cache context must be a positive number of positions, got {context!r}")
    return -(-context // KV_CELL_PAD) * KV_CELL_PAD


def kv_cache_bytes(cfg: ModelConfig, context: int = KV_CONTEXT, bytes_per_value: int = 2) -> int:
    """fp16 keys and values for every layer at `context` positions (padded as llama.cpp pads them), batch 1."""
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * kv_cells(context) * bytes_per_value


def ubatch_used(n_ubatch: int, context: int) -> int:
    """The ubatch llama.cpp runs: `n_ubatch` capped at the context it is asked for (before padding)."""
    return min(n_ubatch, context)


def compute_buffer_bytes(cfg: ModelConfig, context: int = KV_CONTEXT, n_ubatch: int = N_UBATCH,
                         flash_attn: bool = False) -> int:
    """llama.cpp's compute buffer: the peak of the graph it reserves for a ubatch of u tokens against every cell.

    cells = kv_cells(context), u = min(n_ubatch, context) (llama.cpp caps the batch at the context it is
    asked for, before padding), E = d_model x u x 4 bytes (one f32 activation).
    ggml's allocator frees a tensor after its last use, so the buffer is the largest of three phases:
    - attention: the KQ mask (cells x u; f32, f16 with flash attention) + the index inputs + 5 E, and
      without flash attention the scores KQ (cells x u x n_heads, f32; the softmax runs in place);
    - FFN: the mask and index inputs (kept until the last layer) + gate, up and their SwiGLU product
      (3 x d_ff x u, f32) + 4 E;
    - output: the logits of every ubatch token (vocab x u, f32) + 2 E + the output ids (the mask is gone).
    Index inputs: token ids, positions, K-cache rows and output ids (20 bytes a token), V-cache rows (8 bytes
    a token; without flash attention the V cache is stored transposed: 8 bytes per V element).
    Against the figure llama.cpp prints (llama-cpp-python 0.3.36, CPU backend): within 4 E (where the
    allocator's freed blocks fall), and exact for felix-300m's shape. Measured on the CPU only; a GPU backend
    reserves the same graph.
    """
    if isinstance(n_ubatch, bool) or not isinstance(n_ubatch, int) or n_ubatch < 1:
        raise FelixError(f"n_ubatch must be a positive number of tokens, got {n_ubatch!r}")
    cells = kv_cells(context)
    u = ubatch_used(n_ubatch, context)
    act = cfg.d_model * u * F32
    kv_dim = cfg.kv_heads * cfg.head_dim
    inputs = 20 * u + (8 * u if flash_attn else 8 * u * kv_dim)
    mask = cells * u * (2 if flash_attn else F32)
    attention = mask + inputs + 5 * act + (0 if flash_attn else cells * u * cfg.n_heads * F32)
    ffn = mask + inputs + 3 * cfg.d_ff * u * F32 + 4 * act
    output = cfg.vocab_size * u * F32 + 2 * act + 4 * u
    return max(attention, ffn, output)


def runtime_buffers(cfg: ModelConfig, context: int = KV_CONTEXT, n_ubatch: int = N_UBATCH,
                    flash_attn: bool = False) -> dict[str, int]:
    """What llama.cpp allocates besides the weights, by name: the KV cache, the compute and the output buffers."""
    return {"kv_cache_bytes": kv_cache_bytes(cfg, context),
            "compute_buffer_bytes": compute_buffer_bytes(cfg, context, n_ubatch, flash_attn),
            "output_buffer_bytes": output_buffer_bytes(cfg)}


def output_buffer_bytes(cfg: ModelConfig) -> int:
    """llama.cpp's host buffer for the logits it returns: one f32 row of vocab for one sequence."""
    return cfg.vocab_size * F32


def llama_assumptions(n_ubatch: int, flash_attn: bool) -> str:
    """What the deployment figures assume of the llama.cpp run, in words."""
    return (f"llama.cpp with n_ubatch {n_ubatch}, flash attention {'on' if flash_attn else 'off'}, "
            f"one sequence, context padded to a multiple of {KV_CELL_PAD}")
