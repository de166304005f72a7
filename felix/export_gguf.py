"""FelixLM -> GGUF for stock llama.cpp (architecture `llama`), plus SpliceCore as a llama.cpp LoRA adapter.

FelixLM is laid out as HF `LlamaForCausalLM`, so the export is what llama.cpp's convert_hf_to_gguf.py
does for that class: rename the tensors, permute q/k rows from rotate-half RoPE (HF) to llama.cpp's
interleaved-pair RoPE, keep norms in f32, omit `output.weight` (tied embeddings: llama.cpp then
uses `token_embd` as the output matrix), and describe the byte-level BPE tokenizer.

SpliceCore is a LoRA on `ffn_down` (`W_down u + gate * B A u`), so it either folds into ffn_down
(`W + gate * B A`) or goes to a separate adapter GGUF whose scale llama.cpp can change at runtime
(`--lora`, `--lora-scaled`, the server's `POST /lora-adapters`) without rebuilding the base file.

dtypes: f32, f16, q8_0 and q4_0 are stock ggml types (quantized with `gguf.quants`); rq4 is the
llama.cpp fork's ggml type 42 (BetaQ, brief section 4), written as raw bytes. Stock llama.cpp
refuses rq4 files (unknown tensor type); the fork loads them.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from felix.atomic import atomic_path, check_apart, check_output
from felix.config import ModelConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.quant_formats import get_format
from felix.quantize import check_finite
from felix.splice_fold import restore_served
from felix.tokenizer import MAX_TOKEN_BYTES, SPECIAL_TOKENS, FelixTokenizer

DTYPES = ("f32", "f16", "q8_0", "q4_0", "rq4")
RQ4_TYPE_ID = 42  # the fork's GGML_TYPE_RQ4: blocks of 32 weights, fp16 scale + 16 bytes of nibbles
QK = 32  # block size of q8_0, q4_0 and rq4: rows must be a multiple of it
RQ4_MIN_ELEMENTS = 1024  # brief section 4: smaller 2-D tensors stay unquantized
# Bytes per weight for each ggml type name used here (block bytes / block size).
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "rq4": 18 / 32}

# llama.cpp's name for the GPT-2 pre-tokenizer regex
# ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)), which is the regex of HF
# `pre_tokenizers.ByteLevel(use_regex=True)` that `felix.tokenizer.train_tokenizer` uses.
TOKENIZER_PRE = "gpt-2"

# The chat format `felix serve` builds from ids (felix.chat.chat_ids): `<|role|>content<|end|>`
# per turn ("developer" is the system role), then `<|assistant|>` opens the model's turn. One difference:
# llama.cpp and transformers tokenize the rendered text with special tokens parsed, so a special-token string
# in a message acts as that token, where `felix serve` encodes message text literally (README).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{{ '<|' + role + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# -- tensor layout ------------------------------------------------------------------------------
def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half RoPE to llama.cpp's adjacent-pair RoPE.

    Within each head, rows (i, i + d/2) become (2i, 2i + 1): the permutation convert_hf_to_gguf.py
    applies to LlamaForCausalLM's q_proj (n_head) and k_proj (n_head_kv).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `llama_permute` (GGUF q/k rows back to FelixLM's order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every base-model tensor the GGUF holds, by llama.cpp name, as numpy shapes (rows, cols)."""
    d, kv, ff = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (cfg.n_heads * cfg.head_dim, d),
            f"blk.{i}.attn_k.weight": (kv, d),
            f"blk.{i}.attn_v.weight": (kv, d),
            f"blk.{i}.attn_output.weight": (d, cfg.n_heads * cfg.head_dim),
            f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.ffn_gate.weight": (ff, d),
            f"blk.{i}.ffn_up.weight": (ff, d),
            f"blk.{i}.ffn_down.weight": (d, ff),
        }
    shapes["output_norm.weight"] = (d,)
    return shapes


def adapter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The LoRA adapter's tensors: lora_a (rank, d_ff) and lora_b (d_model, rank) per SpliceCore layer.

    In ggml order these are ne = [d_ff, rank] and [rank, d_model]: what llama.cpp's adapter loader
    checks (a.ne[0] == W.ne[0], b.ne[1] == W.ne[1], a.ne[1] == b.ne[0]) and what
    convert_lora_to_gguf.py writes from PEFT's lora_A (r, in) / lora_B (out, r).
    """
    out: dict[str, tuple[int, ...]] = {}
    for i in cfg.splice_layers:
        out[f"blk.{i}.ffn_down.weight.lora_a"] = (cfg.splice_rank, cfg.d_ff)
        out[f"blk.{i}.ffn_down.weight.lora_b"] = (cfg.d_model, cfg.splice_rank)
    return out


def tensor_type(shape: tuple[int, ...], dtype: str) -> str:
    """The ggml type a tensor of `shape` gets under export `dtype`.

    1-D tensors (norms) stay f32 as in every llama.cpp conversion. Block types need rows that are
    whole blocks; a matrix that is not (and, for rq4, one under 1024 elements) falls back to f16,
    as convert_hf_to_gguf.py does.
    """
    if len(shape) == 1 or dtype == "f32":
        return "f32"
    if dtype == "f16":
        return "f16"
    if shape[-1] % QK or (dtype == "rq4" and int(np.prod(shape)) < RQ4_MIN_ELEMENTS):
        return "f16"
    return dtype


@torch.no_grad()
def gguf_tensors(model: FelixLM, splice: str) -> dict[str, np.ndarray]:
    """The base model's tensors as float32 numpy arrays under llama.cpp names, q/k permuted.

    `splice` is "merge" (ffn_down = W + gate * B A) or "adapter" (ffn_down = W; the SpliceCore
    goes to `adapter_tensors`).
    """
    cfg = model.cfg

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    out = {"token_embd.weight": f32(model.tok_emb.weight)}
    for i, block in enumerate(model.layers):
        attn, mlp = block.attn, block.mlp
        down = mlp.down_proj.weight.detach().float()
        if splice == "merge" and mlp.splice is not None:
            down = down + mlp.splice.delta_weight().float()
        out |= {
            f"blk.{i}.attn_norm.weight": f32(block.attn_norm.weight),
            f"blk.{i}.attn_q.weight": llama_permute(f32(attn.q_proj.weight), cfg.n_heads),
            f"blk.{i}.attn_k.weight": llama_permute(f32(attn.k_proj.weight), cfg.kv_heads),
            f"blk.{i}.attn_v.weight": f32(attn.v_proj.weight),
            f"blk.{i}.attn_output.weight": f32(attn.o_proj.weight),
            f"blk.{i}.ffn_norm.weight": f32(block.mlp_norm.weight),
            f"blk.{i}.ffn_gate.weight": f32(mlp.gate_proj.weight),
            f"blk.{i}.ffn_up.weight": f32(mlp.up_proj.weight),
            f"blk.{i}.ffn_down.weight": f32(down),
        }
    out["output_norm.weight"] = f32(model.norm.weight)
    return out


@torch.no_grad()
def adapter_tensors(model: FelixLM) -> dict[str, np.ndarray]:
    """SpliceCore as LoRA pairs, the gate folded into B so adapter scale 1 is the trained model."""
    out = {}
    for i, core in model.splice_cores().items():
        out[f"blk.{i}.ffn_down.weight.lora_a"] = core.a.detach().float().cpu().numpy().copy()
        out[f"blk.{i}.ffn_down.weight.lora_b"] = (core.b * core.gate).detach().float().cpu().numpy().copy()
    return out


# -- encoding -----------------------------------------------------------------------------------
# Largest magnitude each type stores finitely: f16's max, and q8_0/q4_0's f16 block scale (amax/127, amax/8).
F16_MAX = 65504.0
ENCODABLE_MAX = {"f16": F16_MAX, "q8_0": F16_MAX * 127, "q4_0": F16_MAX * 8}


@dataclass
class Encoded:
    """A tensor ready for `GGUFWriter.add_tensor`: its bytes/values and, for block types, the ggml type."""

    data: np.ndarray
    ggml_type: str
    raw_dtype: int | None = None
    raw_shape: tuple[int, ...] | None = None


def encode_tensor(arr: np.ndarray, ggml_type: str) -> Encoded:
    """Convert a float32 array to `ggml_type` (f32, f16, q8_0, q4_0 via `gguf.quants`; rq4 via the codec)."""
    if ggml_type == "f32":
        return Encoded(arr.astype(np.float32), ggml_type)
    if ggml_type == "f16":
        return Encoded(arr.astype(np.float16), ggml_type)
    if ggml_type in ("q8_0", "q4_0"):
        qtype = gguf.GGMLQuantizationType[ggml_type.upper()]
        # uint8 (rows, bytes per row); the writer derives the element shape from its type table.
        return Encoded(gguf.quants.quantize(arr.astype(np.float32), qtype), ggml_type, raw_dtype=qtype)
    if ggml_type == "rq4":
        return Encoded(_rq4_bytes(arr), ggml_type, raw_dtype=RQ4_TYPE_ID, raw_shape=tuple(arr.shape))
    raise FelixError(f"unknown ggml type {ggml_type!r}")


def _rq4_bytes(arr: np.ndarray) -> np.ndarray:
    """RQ4 blocks from the project's codec (`felix.quant_formats`), viewed as int8.

    gguf's writer looks uint8 tensors up in its own type table to turn byte shapes into element
    shapes, and type 42 is not in it; any other 1-byte dtype plus `raw_shape` (the element shape)
    makes it write the bytes and the type id as given.
    """
    packed = get_format("rq4").quantize(torch.from_numpy(arr)).numpy()
    expected = arr.size // QK * 18
    if packed.dtype != np.uint8 or packed.size != expected:
        raise FelixError(f"RQ4 codec gave {packed.dtype} x {packed.size} for {arr.shape}, expected {expected} bytes")
    return np.ascontiguousarray(packed).reshape(arr.shape[0], -1).view(np.int8)


# -- tokenizer ----------------------------------------------------------------------------------
def tokenizer_fields(tok: FelixTokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for the GGUF `gpt2` tokenizer model.

    Special tokens are CONTROL (llama.cpp matches them in text only with parse_special, as
    FelixTokenizer does only with allow_special); rows the model has beyond the tokenizer's
    vocabulary get UNUSED placeholder tokens so that n_vocab equals the embedding's rows.
    """
    n = tok.vocab_size
    if n > vocab_size:
        raise FelixError(f"{tok.path}: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    tokens = [tok.hf.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise FelixError(f"{tok.path}: token ids are not contiguous 0..{n - 1}")
    special = set(SPECIAL_TOKENS)
    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    tokens += [f"<|unused_{i}|>" for i in range(n, vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
    model = json.loads(tok.hf.to_str())["model"]
    # tokenizers >= 0.20 saves merges as pairs, older versions as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def warn_long_tokens(tok: FelixTokenizer) -> int:
    """Warn when tokens are longer than llama-cpp-python's 32-byte detokenize buffer; returns how many are.

    A tokenizer trained before the trainer capped tokens (MAX_TOKEN_BYTES) may hold some, such as a newline and
    a long run of spaces: llama-cpp-python (0.3.36) decodes each of them as b"", so generated text silently
    loses them. llama.cpp's own tools size the buffer and are not affected."""
    lengths = tok.token_byte_lengths()  # 0 for special tokens: llama.cpp writes them only when asked to
    n = int((lengths > MAX_TOKEN_BYTES).sum())
    if n:
        warnings.warn(f"{tok.path}: {n} token{'s are' if n > 1 else ' is'} longer than {MAX_TOKEN_BYTES} bytes "
                      f"(the longest {int(lengths.max())}); llama.cpp itself decodes them, but llama-cpp-python "
                      f"drops them from its output (its per-token buffer is {MAX_TOKEN_BYTES} bytes). Retraining "
                      f"the tokenizer (`felix tokenizer train`), which now caps tokens below that, fixes it",
                      stacklevel=2)
    return n


# -- writers ------------------------------------------------------------------------------------
def _add_tensors(writer, tensors: dict[str, np.ndarray], dtype: str) -> Counter:
    counts: Counter = Counter()
    for name, arr in tensors.items():
        ggml_type = tensor_type(arr.shape, dtype)
        limit = ENCODABLE_MAX.get(ggml_type)
        if limit is not None and arr.size and (peak := float(np.abs(arr).max())) > limit:
            raise FelixError(f"tensor {name}: its largest magnitude {peak:.3g} overflows {ggml_type} "
                             f"(at most {limit:.3g}); export it as f32")
        try:
            enc = encode_tensor(arr, ggml_type)
        except FelixError as exc:
            raise FelixError(f"tensor {name}: {exc}") from None
        writer.add_tensor(name, enc.data, raw_shape=enc.raw_shape, raw_dtype=enc.raw_dtype)
        counts[enc.ggml_type] += 1
    return counts


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_type(dtype: str) -> int:
    """general.file_type (llama_ftype); rq4 has no stock value, so it says GUESSED."""
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "rq4": gguf.LlamaFileType.GUESSED}
    return int(ftypes[dtype])


def write_gguf(path: Path, model: FelixLM, tok: FelixTokenizer, dtype: str, splice: str, name: str) -> Counter:
    """Write the base-model GGUF to `path` (the caller makes it atomic); returns tensor counts by type."""
    cfg = model.cfg
    tensors = gguf_tensors(model, splice)
    expected = gguf_shapes(cfg)
    assert {k: v.shape for k, v in tensors.items()} == expected, "tensor layout drifted from gguf_shapes"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_description(f"Felix-LM exported by felix export gguf (dtype {dtype}, SpliceCore {splice})")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type(dtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = tokenizer_fields(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)  # trained without BOS; documents are separated by <|endoftext|>
    w.add_eos_token_id(tok.eot_id)
    w.add_eot_token_id(tok.special_ids["<|end|>"])  # ends a chat turn
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    counts = _add_tensors(w, tensors, dtype)
    _finish(w)
    return counts


def write_lora_adapter(path: Path, model: FelixLM, name: str) -> int:
    """Write SpliceCore as a llama.cpp LoRA adapter GGUF; returns the number of LoRA pairs.

    alpha = rank makes llama.cpp's scale (user_scale * alpha / rank) equal to the user's scale, so
    scale 1 reproduces the spliced model and 0 the base. Tensors stay f32: they are tiny
    (rank x (d_ff + d_model) per layer) and any stock build loads f32 LoRA pairs.
    """
    cfg = model.cfg
    tensors = adapter_tensors(model)
    if not tensors:
        raise FelixError("this model has no SpliceCore (splice_every or splice_rank is 0): no adapter to write")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.splice_rank))
    w.add_name(f"{name} SpliceCore")
    for tname, arr in tensors.items():
        w.add_tensor(tname, arr.astype(np.float32))
    _finish(w)
    return len(tensors) // 2


# -- entry point --------------------------------------------------------------------------------
def check_target(path: Path, what: str) -> Path:
    """Fail before any work when an output cannot be written: its directory must already exist."""
    path = check_output(path, what, directory=False, make_parents=False)
    if path.exists():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise FelixError(f"{what} {path} exists and is not a GGUF file; refusing to replace it")
    return path


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f16",
                splice_adapter: str | Path | None = None) -> dict:
    """Export a checkpoint to `out` (and SpliceCore to `splice_adapter`, else merged); returns the report.

    Each file is written to a temp file and renamed when complete, the adapter first and the base
    file last, so a failure leaves no partial file behind.
    """
    if dtype not in DTYPES:
        raise FelixError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = check_target(out, "output")
    adapter = check_target(splice_adapter, "adapter output") if splice_adapter is not None else None
    if adapter is not None and adapter.resolve() == out.resolve():
        raise FelixError(f"--splice-adapter and --out are the same file: {out}")
    model, tok, ckpt = load_model(checkpoint)
    for target in (out, adapter):
        if target is not None:
            check_apart(target, ckpt.path)
    stack = PatchStack.open(ckpt.path)
    restore_served(model, tok, ckpt, stack)  # the model as edited, and as an artifact serves its edits
    check_finite(model.state_dict(), str(ckpt.path), "export")
    if adapter is not None and not model.splice_cores():
        raise FelixError(f"{ckpt.path}: the model has no SpliceCore layers, so there is no adapter to write")
    warn_long_tokens(tok)
    name = f"felix-{ckpt.path.parent.parent.name or 'model'}-{ckpt.path.name}"
    splice = "adapter" if adapter is not None else ("merge" if model.splice_cores() else "none")
    # resolved, as `felix quantize` writes its artifact: a symlinked output is written through, not replaced by
    # a file (its target left stale)
    try:
        with atomic_path(out.resolve()) as tmp:
            counts = write_gguf(tmp, model, tok, dtype, "adapter" if adapter is not None else "merge", name)
            if adapter is not None:
                try:
                    with atomic_path(adapter.resolve()) as tmp_adapter:
                        pairs = write_lora_adapter(tmp_adapter, model, name)
                except OSError as exc:
                    raise FelixError(f"adapter output {adapter}: cannot write the GGUF ({exc})") from None
    except OSError as exc:  # a full disk, a directory removed since the check: no temp file is left behind
        raise FelixError(f"output {out}: cannot write the GGUF ({exc})") from None
    report = {"format": "gguf", "checkpoint": str(ckpt.path), "out": str(out), "bytes": out.stat().st_size,
              "splice_patches": len(stack),
              "dtype": dtype, "splice": splice, "tensor_types": dict(counts), "n_params": model.num_params(),
              "model": model.cfg.model_dump(mode="json")}
    if dtype == "rq4":
        report["note"] = "rq4 is the llama.cpp fork's ggml type 42: stock llama.cpp cannot load this file"
    if adapter is not None:
        report |= {"adapter": str(adapter), "adapter_bytes": adapter.stat().st_size, "adapter_pairs": pairs,
                   "adapter_alpha": float(model.cfg.splice_rank)}
    return report
