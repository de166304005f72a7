"""`felix export gguf`: metadata, tensors and tokenizer read back with gguf's reader, the SpliceCore
adapter, the CLI and its report. Bad input: test_export_gguf_errors.py; llama.cpp: test_export_gguf_llama.py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from export_helpers import TINY, export_cached, gguf_field, gguf_tensors

from felix import quant_formats
from felix.cli import main
from felix.errors import FelixError
from felix.export_gguf import (
    CHAT_TEMPLATE,
    DTYPES,
    RQ4_TYPE_ID,
    adapter_shapes,
    gguf_shapes,
    llama_permute,
    llama_unpermute,
)
from felix.tokenizer import SPECIAL_TOKENS


# -- layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_llama_permute_is_a_row_permutation_that_inverts(n_head):
    w = np.arange(n_head * 8 * 3, dtype=np.float32).reshape(n_head * 8, 3)
    p = llama_permute(w, n_head)
    assert sorted(p[:, 0].tolist()) == w[:, 0].tolist()
    np.testing.assert_array_equal(llama_unpermute(p, n_head), w)
    # head 0 of width 8: rotate-half pairs (0, 4), (1, 5), ... become adjacent rows
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def test_f32_metadata_tokenizer_and_tensors(tiny_checkpoint):
    out, _ = export_cached(tiny_checkpoint, "merged-f32", "f32")
    reader = gguf.GGUFReader(out)
    m, tok = TINY, tiny_checkpoint.tokenizer
    expected = {
        "general.architecture": "llama", "llama.context_length": m["max_seq_len"],
        "llama.embedding_length": m["d_model"], "llama.block_count": m["n_layers"],
        "llama.feed_forward_length": m["d_ff"], "llama.attention.head_count": m["n_heads"],
        "llama.attention.head_count_kv": m["n_kv_heads"], "llama.rope.dimension_count": 16,
        "llama.vocab_size": m["vocab_size"], "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.eot_id, "tokenizer.ggml.eos_token_id": tok.eot_id,
        "tokenizer.ggml.eot_token_id": tok.special_ids["<|end|>"], "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: gguf_field(reader, k) for k in expected} == expected
    assert gguf_field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert gguf_field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens, types = gguf_field(reader, "tokenizer.ggml.tokens"), gguf_field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == m["vocab_size"]
    assert tokens[: tok.vocab_size] == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    control = {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(SPECIAL_TOKENS)
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    assert len(merges) == tok.vocab_size - 256 - len(SPECIAL_TOKENS) and all(m.count(" ") == 1 for m in merges)

    model = tiny_checkpoint.model()
    tensors = gguf_tensors(out)
    assert set(tensors) == set(gguf_shapes(model.cfg)) and "output.weight" not in tensors  # tied
    assert all(t == gguf.GGMLQuantizationType.F32 for t, _ in tensors.values())
    assert {k: v.shape for k, (_, v) in tensors.items()} == gguf_shapes(model.cfg)
    blk = model.layers[1]
    np.testing.assert_array_equal(tensors["token_embd.weight"][1], model.tok_emb.weight.detach().numpy())
    q, k = tensors["blk.1.attn_q.weight"][1], tensors["blk.1.attn_k.weight"][1]
    assert not np.array_equal(q, blk.attn.q_proj.weight.detach().numpy())  # permuted for llama.cpp's RoPE
    np.testing.assert_array_equal(llama_unpermute(q, 4), blk.attn.q_proj.weight.detach())
    np.testing.assert_array_equal(llama_unpermute(k, 2), blk.attn.k_proj.weight.detach())
    merged = blk.mlp.down_proj.weight + blk.mlp.splice.delta_weight()
    np.testing.assert_allclose(tensors["blk.1.ffn_down.weight"][1], merged.detach().numpy(), atol=1e-6)
    assert not np.allclose(tensors["blk.1.ffn_down.weight"][1], blk.mlp.down_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"][1], model.layers[0].mlp.down_proj.weight.detach())


def test_model_rows_beyond_the_tokenizer_get_unused_tokens(tiny_checkpoint):
    from felix.export_gguf import tokenizer_fields

    tok = tiny_checkpoint.tokenizer
    tokens, types, _ = tokenizer_fields(tok, tok.vocab_size + 16)
    assert len(tokens) == len(set(tokens)) == tok.vocab_size + 16
    assert types[tok.vocab_size:] == [gguf.TokenType.UNUSED] * 16
    with pytest.raises(FelixError, match="tokenizer has 400 tokens but the model's vocab_size is 300"):
        tokenizer_fields(tok, 300)


# Worst-case error relative to the tensor's largest |w|: f16 rounding; q8_0 and q4_0 round to a
# per-block step of amax/127 and amax/8 (q4_0 maps the signed max to -8, so up to one step).
TOLERANCE = {"f16": 1e-3, "q8_0": 0.5 / 127 + 1e-4, "q4_0": 1 / 8 + 1e-4}


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_quantized_tensors_dequantize_within_format_tolerance(tiny_checkpoint, dtype):
    out, _ = export_cached(tiny_checkpoint, f"merged-{dtype}", dtype)
    ref, got = gguf_tensors(export_cached(tiny_checkpoint, "merged-f32", "f32")[0]), gguf_tensors(out)
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    for name, (ttype, value) in got.items():
        want = ref[name][1]
        assert ttype == (gguf.GGMLQuantizationType.F32 if value.ndim == 1 else qtype), name
        err = np.abs(value - want).max() / np.abs(want).max()
        assert err <= TOLERANCE[dtype], (name, err)


def test_splice_adapter_file_matches_llama_cpp_lora_layout(tiny_checkpoint):
    out, adapter = export_cached(tiny_checkpoint, "base-f32", "f32", adapter=True)
    model = tiny_checkpoint.model()
    base = gguf_tensors(out)
    np.testing.assert_array_equal(base["blk.1.ffn_down.weight"][1], model.layers[1].mlp.down_proj.weight.detach())
    reader = gguf.GGUFReader(adapter)
    assert gguf_field(reader, "general.type") == "adapter" and gguf_field(reader, "adapter.type") == "lora"
    assert gguf_field(reader, "general.architecture") == "llama"
    assert gguf_field(reader, "adapter.lora.alpha") == pytest.approx(TINY["splice_rank"])
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == set(adapter_shapes(model.cfg)) == {f"blk.1.ffn_down.weight.lora_{x}" for x in "ab"}
    a, b = by_name["blk.1.ffn_down.weight.lora_a"], by_name["blk.1.ffn_down.weight.lora_b"]
    # ggml order: a.ne = [d_ff, rank] (= ffn_down.ne[0]), b.ne = [rank, d_model] (= ffn_down.ne[1])
    assert a.shape.tolist() == [TINY["d_ff"], TINY["splice_rank"]]
    assert b.shape.tolist() == [TINY["splice_rank"], TINY["d_model"]]
    core = model.layers[1].mlp.splice
    np.testing.assert_array_equal(np.asarray(a.data), core.a.detach().numpy())
    np.testing.assert_allclose(np.asarray(b.data), (0.75 * core.b).detach().numpy(), rtol=1e-6)
    w = base["blk.1.ffn_down.weight"][1] + np.asarray(b.data) @ np.asarray(a.data)
    merged = gguf_tensors(export_cached(tiny_checkpoint, "merged-f32", "f32")[0])
    np.testing.assert_allclose(w, merged["blk.1.ffn_down.weight"][1], atol=1e-6)


class _RawReader(gguf.GGUFReader):
    """GGUFReader that records tensor infos instead of decoding them: it has no entry for type 42."""

    def _build_tensors(self, start_offs, fields):
        self.raw = {}
        for field in fields:
            _, name, _, dims, dtype, offset = field.parts
            self.raw[bytes(name).decode()] = (int(dtype[0]), dims.tolist(), int(start_offs + offset[0]))
        self.tensors = []


def test_rq4_writes_type_42_blocks_from_the_codec(tiny_checkpoint):
    out, _ = export_cached(tiny_checkpoint, "merged-rq4", "rq4")
    reader = _RawReader(out)
    assert gguf_field(reader, "general.file_type") == gguf.LlamaFileType.GUESSED
    ref = gguf_tensors(export_cached(tiny_checkpoint, "merged-f32", "f32")[0])
    for name, (ttype, dims, offset) in reader.raw.items():
        want = ref[name][1]
        if want.ndim == 1:
            assert ttype == gguf.GGMLQuantizationType.F32
            continue
        assert ttype == RQ4_TYPE_ID and dims == list(reversed(want.shape)), name
        n_bytes = want.size // 32 * 18
        blocks = np.asarray(reader.data[offset : offset + n_bytes])
        codec = quant_formats.get_format("rq4")
        expected = codec.quantize(torch.from_numpy(want))
        np.testing.assert_array_equal(blocks, expected.numpy().reshape(-1))
        # RQ4 step: the outer centroid 0.12282 x d = absmax; neighbours are at most 0.0399 d apart
        back = codec.dequantize(torch.from_numpy(blocks.copy()).reshape(expected.shape), want.shape).numpy()
        assert np.abs(back - want).max() <= 0.5 * 0.0399 / 0.12282 * np.abs(want).max() + 1e-6, name




# -- CLI and report -----------------------------------------------------------------------------
def test_cli_json_report(tiny_checkpoint, tmp_path, capsys):
    out, adapter = tmp_path / "m.gguf", tmp_path / "m-lora.gguf"
    assert main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.root / "run"), "--out", str(out),
                 "--dtype", "q8_0", "--splice-adapter", str(adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bytes"] == out.stat().st_size and report["adapter_bytes"] == adapter.stat().st_size
    assert out.stat().st_mode & 0o044 and adapter.stat().st_mode & 0o044  # readable by the serving user
    assert report["splice"] == "adapter" and report["tensor_types"] == {"q8_0": 15, "f32": 5}
    mem = report["deployment_memory"]
    assert mem["context"] == 2048 and mem["cap_bytes"] == 4 * 2**30 and mem["adapter"]
    for name in ("felix-300m", "felix-500m", "this_model"):
        assert set(mem["models"][name]) == set(DTYPES)
    m300 = mem["models"]["felix-300m"]
    # 24 layers x 1024 (16 heads, no GQA) x 2048 positions x K and V x 2 bytes
    assert m300["f16"]["kv_cache_bytes"] == 2 * 24 * 1024 * 2048 * 2
    assert m300["q4_0"]["weights_bytes"] < m300["q8_0"]["weights_bytes"] < m300["f16"]["weights_bytes"]
    assert m300["rq4"]["fits_cap"] and m300["f16"]["fits_cap"]
    # the estimate and the written file agree up to alignment padding and metadata
    this = mem["models"]["this_model"]["q8_0"]["weights_bytes"]
    assert this <= report["bytes"] <= this + 64 * 1024


def test_cli_kv_context_budgets_the_deployment_memory_at_that_context(tiny_checkpoint, tmp_path, capsys):
    from felix.config import ModelConfig
    from felix.export_memory import memory_report

    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out), "--dtype", "q8_0",
                 "--kv-context", "8192", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    mem = report["deployment_memory"]
    # SpliceCore merged (the default): the deployment has no adapter to count
    assert mem == memory_report(ModelConfig(**report["model"]), context=8192, adapter=False) and mem["context"] == 8192
    assert mem["models"]["felix-300m"]["f16"]["kv_cache_bytes"] == 2 * 24 * 1024 * 8192 * 2
    assert "--kv-context 8192 is past the model's max_seq_len 128" in captured.err  # TINY's
    # within the trained positions: no note, and the text report names the context
    assert main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out), "--dtype", "q8_0",
                 "--kv-context", "128"]) == 0
    captured = capsys.readouterr()
    assert "f16 KV cache at 128 context" in captured.out and "kv-context" not in captured.err


def test_cli_default_merges_splice(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out), "--dtype", "f32"]) == 0
    assert "deployment memory" in capsys.readouterr().out
    merged = gguf_tensors(export_cached(tiny_checkpoint, "merged-f32", "f32")[0])
    np.testing.assert_array_equal(gguf_tensors(out)["blk.1.ffn_down.weight"][1], merged["blk.1.ffn_down.weight"][1])
