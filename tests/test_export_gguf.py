"""`felix export gguf`: metadata, tensors and tokenizer read back with gguf's reader, the SpliceCore
adapter, bad input, and (slow) the files run through llama.cpp itself via llama-cpp-python."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import config_from_dict
from felix.corpus import stdlib_files
from felix.errors import FelixError
from felix.export_gguf import (
    CHAT_TEMPLATE,
    DTYPES,
    RQ4_TYPE_ID,
    adapter_shapes,
    export_gguf,
    gguf_shapes,
    llama_permute,
    llama_unpermute,
)
from felix.generate import generate
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.tokenizer import SPECIAL_TOKENS, FelixTokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")

# Every matrix dimension a multiple of 32 (q8_0/q4_0/rq4 blocks); GQA (4 heads, 2 kv heads);
# SpliceCore on layer 1. init_std 0.1 and a short training run give peaked next-token
# distributions, so greedy decoding compares decisions rather than near-ties.
TINY = {"vocab_size": 400, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
        "max_seq_len": 128, "splice_every": 2, "splice_rank": 4, "init_std": 0.1}
PROMPTS = ["def main(args):\n    return", "The quick brown fox", "import os\nimport sys\n\nclass",
           "    # Return the value of the"]
SAMPLE_TEXTS = [
    "Hello, world! It's 2024 and we're testing tokenizers.",
    "def f(x):\n\treturn x ** 2  # square\n\n\n    indented   spaces   ",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🎉🚀, math ∑∫√.",
    "tabs\tand\nnewlines\r\nand   multiple    spaces  ",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "<|user|> literal markers stay text <|endoftext|>",
]


@dataclass(frozen=True)
class TinyCheckpoint:
    root: Path
    path: Path  # the step-N directory
    tokenizer_path: Path

    def model(self) -> FelixLM:
        return load_model(self.path)[0]

    @property
    def tokenizer(self) -> FelixTokenizer:
        return FelixTokenizer.load(self.tokenizer_path)


def _texts(limit: int = 50_000) -> list[str]:
    texts, total = [], 0
    for path in stdlib_files(7):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if 1_000 < len(text) < 8_000:
            texts.append(text)
            total += len(text)
        if total > limit:
            break
    return texts


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """A briefly trained tiny FelixLM with a nonzero SpliceCore (gate 0.75), saved as a checkpoint."""
    root = tmp_path_factory.mktemp("export")
    texts = _texts()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = train_tokenizer([root / "corpus.jsonl"], 400, root / "tokenizer.json")
    cfg = config_from_dict({"model": TINY, "train": {"seq_len": 128}})
    torch.manual_seed(0)
    model = FelixLM(cfg.model)
    ids = torch.tensor([i for t in tok.encode_batch(texts) for i in [*t, tok.eot_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for core in model.splice_cores().values():
            core.b.normal_(std=0.3, generator=gen)
            core.gate.fill_(0.75)
    path = save_checkpoint(root / "run", 60, model, cfg, {}, tokenizer_path=root / "tokenizer.json")
    return TinyCheckpoint(root, path, root / "tokenizer.json")


def _field(reader, key):
    """A GGUF metadata value as Python: str, number, or list."""
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def _tensors(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """name -> (ggml type, dequantized float32 array in numpy (rows, cols) order)."""
    reader = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
        tuple(reversed(t.shape.tolist())))) for t in reader.tensors}


def _export(ckpt: TinyCheckpoint, name: str, dtype: str, adapter: bool = False) -> tuple[Path, Path | None]:
    out = ckpt.root / f"{name}.gguf"
    adapter_path = ckpt.root / f"{name}-lora.gguf" if adapter else None
    if not out.exists():
        export_gguf(ckpt.path, out, dtype, adapter_path)
    return out, adapter_path


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
    out, _ = _export(tiny_checkpoint, "merged-f32", "f32")
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
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == m["vocab_size"]
    assert tokens[: tok.vocab_size] == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    control = {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(SPECIAL_TOKENS)
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == tok.vocab_size - 256 - len(SPECIAL_TOKENS) and all(m.count(" ") == 1 for m in merges)

    model = tiny_checkpoint.model()
    tensors = _tensors(out)
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
    out, _ = _export(tiny_checkpoint, f"merged-{dtype}", dtype)
    ref, got = _tensors(_export(tiny_checkpoint, "merged-f32", "f32")[0]), _tensors(out)
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    for name, (ttype, value) in got.items():
        want = ref[name][1]
        assert ttype == (gguf.GGMLQuantizationType.F32 if value.ndim == 1 else qtype), name
        err = np.abs(value - want).max() / np.abs(want).max()
        assert err <= TOLERANCE[dtype], (name, err)


def test_splice_adapter_file_matches_llama_cpp_lora_layout(tiny_checkpoint):
    out, adapter = _export(tiny_checkpoint, "base-f32", "f32", adapter=True)
    model = tiny_checkpoint.model()
    base = _tensors(out)
    np.testing.assert_array_equal(base["blk.1.ffn_down.weight"][1], model.layers[1].mlp.down_proj.weight.detach())
    reader = gguf.GGUFReader(adapter)
    assert _field(reader, "general.type") == "adapter" and _field(reader, "adapter.type") == "lora"
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "adapter.lora.alpha") == pytest.approx(TINY["splice_rank"])
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
    merged = _tensors(_export(tiny_checkpoint, "merged-f32", "f32")[0])
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
    quant_formats = pytest.importorskip("felix.quant_formats", reason="the RQ4 codec has not landed")
    out, _ = _export(tiny_checkpoint, "merged-rq4", "rq4")
    reader = _RawReader(out)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.GUESSED
    ref = _tensors(_export(tiny_checkpoint, "merged-f32", "f32")[0])
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


# -- bad input ----------------------------------------------------------------------------------
def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_unknown_dtype_and_missing_directory_fail_cleanly(tiny_checkpoint, tmp_path):
    with pytest.raises(FelixError, match="unknown dtype 'q3_k'.*f32, f16, q8_0, q4_0, rq4"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "q3_k")
    with pytest.raises(FelixError, match="directory .*nowhere does not exist"):
        export_gguf(tiny_checkpoint.path, tmp_path / "nowhere" / "m.gguf", "f16")
    with pytest.raises(FelixError, match="adapter output .*does not exist"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16", tmp_path / "nowhere" / "a.gguf")
    assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []


def test_the_cli_dtype_is_a_choice(tiny_checkpoint, tmp_path, capsys):
    """Before: any string, refused only by the exporter (its help a free-form list)."""
    with pytest.raises(SystemExit) as exc:
        main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(tmp_path / "m.gguf"),
              "--dtype", "bf4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --dtype: invalid choice: 'bf4'" in err
    assert "{f32,f16,q8_0,q4_0,rq4}" in err and list(tmp_path.iterdir()) == []


def test_an_output_that_would_replace_its_source_or_another_file_is_refused(tiny_checkpoint, tmp_path):
    weights = tiny_checkpoint.path / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FelixError, match="not a GGUF file"):
        export_gguf(tiny_checkpoint.path, weights, "f16")
    with pytest.raises(FelixError, match="sit inside the checkpoint"):
        export_gguf(tiny_checkpoint.path, tiny_checkpoint.path / "m.gguf", "f16")
    notes = tmp_path / "notes.gguf"
    notes.write_text("keep me")
    with pytest.raises(FelixError, match="notes.gguf exists and is not a GGUF file"):
        export_gguf(tiny_checkpoint.path, notes, "f16")
    with pytest.raises(FelixError, match="adapter output .*not a GGUF file"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16", notes)
    assert weights.read_bytes() == before and notes.read_text() == "keep me"
    # an earlier export is a GGUF file, and replaced
    export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f32")
    export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]


def _with_weight(tiny_checkpoint, tmp_path: Path, value: float) -> Path:
    bad = Path(shutil.copytree(tiny_checkpoint.path, tmp_path / "ckpt"))
    state = load_file(str(bad / "model.safetensors"))
    state["layers.0.mlp.up_proj.weight"][3, 7] = value
    save_file(state, str(bad / "model.safetensors"))
    return bad


def test_non_finite_or_unencodable_weights_are_refused_by_name(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bad = _with_weight(tiny_checkpoint, tmp_path, float("nan"))
    with pytest.raises(FelixError, match="layers.0.mlp.up_proj.weight has 1 NaN/inf values; refusing to export"):
        export_gguf(bad, out / "m.gguf", "rq4")
    big = _with_weight(tiny_checkpoint, tmp_path / "big", 1e5)
    with pytest.raises(FelixError, match=r"blk.0.ffn_up.weight: its largest magnitude 1e\+05 overflows f16"):
        export_gguf(big, out / "m.gguf", "f16")
    assert list(out.iterdir()) == []
    export_gguf(big, out / "m.gguf", "q8_0")  # q8_0's block scale holds it
    assert np.isfinite(_tensors(out / "m.gguf")["blk.0.ffn_up.weight"][1]).all()


def test_checkpoint_disagreeing_with_its_config_fails_cleanly(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (bad / f).write_bytes((tiny_checkpoint.path / f).read_bytes())
    doc = json.loads((tiny_checkpoint.path / "trainer.json").read_text())
    doc = copy.deepcopy(doc)
    doc["config"]["model"]["d_ff"] = 96
    (bad / "trainer.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FelixError, match="weights do not match the config.*ffn|shape mismatch"):
        export_gguf(bad, out / "m.gguf", "f16")
    assert list(out.iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tiny_checkpoint, tmp_path, monkeypatch):
    import felix.export_gguf as eg

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eg, "write_lora_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16", tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_an_error_and_leaves_no_file(tiny_checkpoint, tmp_path, capsys, file_size_limit):
    """Before: the OSError of the write was a traceback (rc 1)."""
    out = tmp_path / "m.gguf"
    export_gguf(tiny_checkpoint.path, out, "q8_0")
    before = out.read_bytes()
    with file_size_limit(8192):  # the GGUF is larger: its write fails midway, as on a full disk
        rc = main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out), "--dtype", "f32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"felix export gguf: error: output {out}: cannot write the GGUF"), err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_symlinked_out_is_written_through(tiny_checkpoint, tmp_path):
    """Before: the link was replaced by a file, its target left stale."""
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "m-v1.gguf"
    export_gguf(tiny_checkpoint.path, target, "f32")
    (tmp_path / "current.gguf").symlink_to("models/m-v1.gguf")
    (tmp_path / "lora.gguf").symlink_to("models/lora-v1.gguf")  # dangling: written where it points
    export_gguf(tiny_checkpoint.path, tmp_path / "current.gguf", "q8_0", tmp_path / "lora.gguf")
    assert (tmp_path / "current.gguf").is_symlink() and (tmp_path / "lora.gguf").is_symlink()
    assert _tensors(target)["blk.0.ffn_up.weight"][0] == gguf.GGMLQuantizationType.Q8_0
    assert (tmp_path / "models" / "lora-v1.gguf").read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["lora-v1.gguf", "m-v1.gguf"]


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
    merged = _tensors(_export(tiny_checkpoint, "merged-f32", "f32")[0])
    np.testing.assert_array_equal(_tensors(out)["blk.1.ffn_down.weight"][1], merged["blk.1.ffn_down.weight"][1])


# -- through llama.cpp (llama-cpp-python) --------------------------------------------------------
def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install felix-lm[llama])")
    from felix.local_teacher import disable_llama_extra_buffers

    disable_llama_extra_buffers()  # VMs that advertise AMX without supporting it die with SIGILL otherwise
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                           type_k=0, type_v=0, **kwargs)  # f32 KV cache: the comparison is with fp32 PyTorch


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@torch.no_grad()
def _torch_logits(model: FelixLM, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


def _compare(llm, model: FelixLM, tok: FelixTokenizer, atol: float) -> float:
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        diff = np.abs(_llama_logits(llm, ids) - _torch_logits(model, ids)).max()
        worst = max(worst, float(diff))
        assert diff <= atol, (prompt, diff)
        assert _llama_greedy(llm, ids, 24) == generate(model, ids, 24, greedy=True), prompt
    return worst


# Measured on the tiny model: f32 GGUF (f32 KV cache) vs PyTorch fp32, max |logit diff| ~3e-6.
LOGIT_ATOL = 1e-3


@pytest.mark.slow
def test_llama_cpp_f32_logits_and_greedy_match_pytorch(tiny_checkpoint):
    out, _ = _export(tiny_checkpoint, "merged-f32", "f32")
    worst = _compare(_llama(out), tiny_checkpoint.model(), tiny_checkpoint.tokenizer, LOGIT_ATOL)
    print(f"f32 GGUF vs PyTorch: max |logit diff| = {worst:.2e}")


def _set_lora_scale(llm, scale: float) -> None:
    """Change the loaded adapter's scale in place, as llama-server's POST /lora-adapters does.

    llama-cpp-python exposes this only through its low-level binding (and its private handles).
    """
    import ctypes

    import llama_cpp

    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale)) == 0


@pytest.mark.slow
def test_llama_cpp_splice_adapter_scale_is_the_gate(tiny_checkpoint):
    """Adapter scale 1 = the spliced model, 0 = the base model (SpliceCore zeroed), 0.5 = half the
    gate; the scale changes at runtime on the loaded model, without rebuilding or reloading."""
    out, adapter = _export(tiny_checkpoint, "base-f32", "f32", adapter=True)
    llm, tok = _llama(out, lora_path=str(adapter), lora_scale=1.0), tiny_checkpoint.tokenizer
    spliced = tiny_checkpoint.model()
    ids = tok.encode(PROMPTS[0])
    for scale in (1.0, 0.0, 0.5):
        model = tiny_checkpoint.model()
        for core in model.splice_cores().values():
            core.gate.fill_(0.75 * scale)
        if scale == 0.0:  # the splice must matter, or this test would prove nothing
            assert np.abs(_torch_logits(model, ids) - _torch_logits(spliced, ids)).max() > 0.1
        _set_lora_scale(llm, scale)
        worst = _compare(llm, model, tok, LOGIT_ATOL)
        print(f"adapter scale {scale}: max |logit diff| = {worst:.2e}")


# Mean KL(PyTorch || llama.cpp q8_0) per position; measured 2.1e-4 (max 9.2e-4) on the tiny model.
Q8_KL_MAX = 1e-3


@pytest.mark.slow
def test_llama_cpp_q8_0_within_kl(tiny_checkpoint):
    out, _ = _export(tiny_checkpoint, "merged-q8_0", "q8_0")
    llm, model, tok = _llama(out), tiny_checkpoint.model(), tiny_checkpoint.tokenizer
    kls = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        p = torch.log_softmax(torch.from_numpy(_torch_logits(model, ids)).double(), -1)
        q = torch.log_softmax(torch.from_numpy(_llama_logits(llm, ids)).double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
    kl = torch.cat(kls)
    print(f"q8_0 KL: mean {kl.mean():.2e}, max {kl.max():.2e}")
    assert kl.mean() <= Q8_KL_MAX


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_felix(tiny_checkpoint):
    out, _ = _export(tiny_checkpoint, "merged-f32", "f32")
    llm, tok = _llama(out, vocab_only=True), tiny_checkpoint.tokenizer
    for text in [*SAMPLE_TEXTS, *PROMPTS, *_texts(20_000)[:3]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text[:60]
    chat = "<|system|>Be brief.<|end|><|user|>Hi there<|end|>\n<|assistant|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, allow_special=True)
    assert llm.token_eos() == tok.eot_id
    # llama-cpp-python renders the GGUF's chat template (its chat completions use it) as felix serve does
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|endoftext|>", "<|endoftext|>")
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = fmt(messages=messages).prompt
    assert prompt == "<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>"
    sp = tok.special_ids
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == [
        sp["<|system|>"], *tok.encode("Be brief."), sp["<|end|>"], sp["<|user|>"], *tok.encode("Hi there"),
        sp["<|end|>"], sp["<|assistant|>"]]
