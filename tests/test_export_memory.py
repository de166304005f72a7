"""The deployment-memory estimate against what llama.cpp itself allocates: the KV cache for the padded context,
the compute buffer (with and without flash attention, at several n_ubatch) and the output buffer, read from
the sizes llama.cpp logs while it loads small exports; and the verdicts for felix-300m that follow."""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import pytest
import torch

from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import ModelConfig, config_from_dict, load_config
from felix.errors import FelixError
from felix.export_gguf import write_gguf
from felix.export_memory import memory_report
from felix.llama_memory import VRAM_CAP_BYTES, compute_buffer_bytes, kv_cache_bytes, kv_cells, output_buffer_bytes
from felix.model import FelixLM
from felix.tokenizer import FelixTokenizer, train_tokenizer

MIB = 2**20
PRINTED = 0.005 + 1e-9  # llama.cpp prints MiB to 2 decimals: half the last digit (0.125 prints as 0.12)
TEXT = "def main(args):\n    return self.value + 1  # the quick brown fox jumps over the lazy dog\n"
MHA = {"vocab_size": 320, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128}
GQA = {"vocab_size": 1024, "n_layers": 2, "d_model": 256, "n_heads": 8, "n_kv_heads": 4, "d_ff": 768}
# felix-300m's widths on 2 layers: llama.cpp's compute buffer does not depend on the layer count (a 24-layer
# random felix-300m export printed the same 82.0098 / 68.0020 / 1102.0098 MiB at 2048 / 2048 fa / 32768)
M300_WIDTHS = load_config("felix-300m").model.model_dump() | {"n_layers": 2}
SHAPES = {"mha": MHA, "gqa": GQA, "m300": M300_WIDTHS}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> FelixTokenizer:
    root = tmp_path_factory.mktemp("mem-tok")
    (root / "c.jsonl").write_text(json.dumps({"text": TEXT * 20}) + "\n", encoding="utf-8")
    return train_tokenizer([root / "c.jsonl"], 300, root / "tokenizer.json")


@pytest.fixture(scope="module")
def exports(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """name -> an f16 GGUF of a random model of that shape."""
    root = tmp_path_factory.mktemp("mem-gguf")
    out = {}
    for name in SHAPES:
        torch.manual_seed(0)
        out[name] = root / f"{name}.gguf"
        write_gguf(out[name], FelixLM(_model(name)), tokenizer, "f16", "merge", name)
    return out


def _config(name: str) -> dict:
    return {"model": SHAPES[name] | {"max_seq_len": 64}, "train": {"seq_len": 64}}


def _model(name: str) -> ModelConfig:
    return config_from_dict(_config(name)).model


def llama_cpp_sizes(path: Path, n_ctx: int, n_ubatch: int, flash_attn: bool) -> dict[str, float]:
    """Load `path` in llama.cpp and return what its log says it allocated: KV cells, MiB of KV cache,
    compute buffer (all backends) and output buffer."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from llama_cpp import _logger

    from felix.local_teacher import disable_llama_extra_buffers

    disable_llama_extra_buffers()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=max(512, n_ubatch), n_ubatch=n_ubatch,
                              flash_attn=flash_attn, verbose=False, n_threads=2)
        llm.close()
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(lines)
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", log)
    compute = re.findall(r"\S+ compute buffer size =\s*([\d.]+) MiB", log)
    output = re.findall(r"\S+\s+output buffer size =\s*([\d.]+) MiB", log)
    fa = re.search(r"flash_attn\s*= (\w+)", log)
    assert kv and compute and output and fa, f"llama.cpp's log lacks the sizes:\n{log[-3000:]}"
    assert fa.group(1) == ("enabled" if flash_attn else "disabled")
    return {"cells": int(kv.group(2)), "kv": float(kv.group(1)), "compute": sum(map(float, compute)),
            "output": sum(map(float, output))}


# (model, context, n_ubatch): contexts off the 256-cell grid are padded; n_ubatch 512 is llama.cpp's default,
# and past a context of 300 llama.cpp caps the ubatch at 300
RUNS = [("mha", 1000, 512), ("mha", 4096, 128), ("gqa", 3000, 200), ("gqa", 300, 512), ("m300", 8192, 512)]


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn", [False, True], ids=["no-fa", "fa"])
@pytest.mark.parametrize(("name", "context", "n_ubatch"), RUNS)
def test_estimate_matches_what_llama_cpp_allocates(exports, name, context, n_ubatch, flash_attn):
    got = llama_cpp_sizes(exports[name], context, n_ubatch, flash_attn)
    model = _model(name)
    assert got["cells"] == kv_cells(context) and got["cells"] % 256 == 0 and got["cells"] >= context
    assert abs(kv_cache_bytes(model, context) / MIB - got["kv"]) <= PRINTED
    assert abs(output_buffer_bytes(model) / MIB - got["output"]) <= PRINTED
    # The compute buffer is ggml's allocator packing the graph; where the freed blocks fall moves its peak by
    # a few activations (E = d_model x u x 4 bytes: within 3.05 E over 128 loads of 7 shapes, u 100 to 512).
    # Those blocks are small next to KQ, the mask and the logits, which the estimate holds exactly.
    estimate = compute_buffer_bytes(model, context, n_ubatch, flash_attn)
    activation = model.d_model * min(n_ubatch, context) * 4
    assert abs(estimate / MIB - got["compute"]) <= 4 * activation / MIB + PRINTED, (estimate / MIB, got)
    if name == "m300":  # felix-300m's shape: no fragmentation, the figure to the printed digit
        assert abs(estimate / MIB - got["compute"]) <= PRINTED


def test_felix_300m_at_32k_without_flash_attention_does_not_fit_4_gib():
    """At 32768 the attention scores are 32768 x 512 x 16 heads x 4 bytes = 1 GiB: with 3 GiB of KV cache and
    0.81 GiB of f16 weights that is past the cap; flash attention never holds them, and f16 fits (3.88 GiB)."""
    plain = memory_report(context=32768)
    flash = memory_report(context=32768, flash_attn=True)
    assert plain["flash_attn"] is False and plain["n_ubatch"] == 512 and "flash attention off" in plain["assumes"]
    f16, f16_fa = plain["models"]["felix-300m"]["f16"], flash["models"]["felix-300m"]["f16"]
    # what llama.cpp printed for a 24-layer felix-300m f16 export at n_ctx 32768, n_ubatch 512
    assert abs(f16["compute_buffer_bytes"] / MIB - 1102.0098) < 5e-5
    assert abs(f16_fa["compute_buffer_bytes"] / MIB - 68.0020) < 5e-5
    assert f16["kv_cache_bytes"] == 3 * 2**30
    assert not f16["fits_cap"] and f16["total_bytes"] > VRAM_CAP_BYTES
    assert f16_fa["fits_cap"] and f16_fa["total_bytes"] == (
        f16_fa["weights_bytes"] + f16_fa["kv_cache_bytes"] + f16_fa["adapter_bytes"]
        + f16_fa["compute_buffer_bytes"] + f16_fa["output_buffer_bytes"])
    # 3 GiB of KV cache + 1 GiB of scores fill the cap before any weight: no dtype fits without flash attention
    assert not any(row["fits_cap"] for row in plain["models"]["felix-300m"].values())


def test_kv_cache_is_sized_for_the_padded_context():
    model = _model("mha")
    per_cell = 2 * 2 * 64 * 2
    assert [kv_cells(c) for c in (1, 256, 257, 1000, 2048, 32000, 33000)] == [256, 256, 512, 1024, 2048, 32000, 33024]
    assert kv_cache_bytes(model, 1000) == kv_cache_bytes(model, 1024) == 1024 * per_cell
    mem = memory_report(model, configs=(), context=1000)
    assert mem["context"] == 1000 and mem["kv_cells"] == 1024
    assert mem["models"]["this_model"]["f16"]["kv_cache_bytes"] == 1024 * per_cell


@pytest.mark.parametrize("n_ubatch", [0, -1, 2.5, True])
def test_a_bad_ubatch_is_an_error_naming_it(n_ubatch):
    with pytest.raises(FelixError, match="n_ubatch must be a positive number of tokens"):
        compute_buffer_bytes(_model("mha"), 2048, n_ubatch)


def test_cli_flags_set_the_llama_run(tokenizer, tmp_path, capsys):
    cfg = config_from_dict(_config("mha"))
    path = save_checkpoint(tmp_path / "run", 1, FelixLM(cfg.model), cfg, {}, tokenizer_path=tokenizer.path)
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(out), "--kv-context", "1000",
                 "--ubatch-size", "256", "--flash-attn", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["deployment_memory"]
    assert mem == memory_report(cfg.model, context=1000, n_ubatch=256, flash_attn=True, adapter=False)  # merged
    row = mem["models"]["this_model"]["f16"]
    assert row["compute_buffer_bytes"] == compute_buffer_bytes(cfg.model, 1000, 256, True)
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(out), "--kv-context", "1000"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "f16 KV cache at 1000 context (llama.cpp pads it to 1024)" in text
    assert "n_ubatch 512, flash attention off" in text


def test_quantize_counts_the_same_buffers(tmp_path, capsys):
    model = _model("mha")
    yaml = tmp_path / "c.yaml"
    yaml.write_text(json.dumps(_config("mha")))
    assert main(["quantize", "--config", str(yaml), "--format", "q8_0", "--kv-context", "1000", "--flash-attn",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    compute = compute_buffer_bytes(model, 1000, 512, True)
    assert report["kv_cells"] == 1024 and report["compute_buffer_bytes"] == compute and report["flash_attn"]
    assert report["deployment_bytes"] == (report["weight_bytes"] + report["kv_cache_bytes"] + compute
                                          + output_buffer_bytes(model))
    assert main(["quantize", "--config", str(yaml), "--format", "q8_0", "--kv-context", "1000"]) == 0
    text = capsys.readouterr().out
    assert "llama.cpp buffers (n_ubatch 512, flash attention off)" in text and "KV at 1000 ctx (padded to 1024)" in text


@pytest.mark.parametrize("argv", [["quantize"], ["export", "gguf"]])
def test_help_shows_the_llama_run_flags(capsys, argv):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ubatch-size N" in text and "--flash-attn" in text and "default 512" in text


def test_the_hf_export_takes_no_llama_cpp_flags(capsys):
    """Before: `export hf` took --ubatch-size/--flash-attn and printed llama.cpp's memory table, which says
    nothing of a transformers deployment."""
    with pytest.raises(SystemExit):
        main(["export", "hf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kv-context N" in text and "--ubatch-size" not in text and "--flash-attn" not in text
    assert "DynamicCache" in text
    with pytest.raises(SystemExit) as exc:
        main(["export", "hf", "--checkpoint", "x", "--out", "y", "--flash-attn"])
    assert exc.value.code == 2 and "unrecognized arguments: --flash-attn" in capsys.readouterr().err


def test_a_ubatch_past_the_context_is_reported_as_the_ubatch_used(tokenizer, tmp_path, capsys):
    """Before: `--ubatch-size 100000` was echoed as n_ubatch 100000, though the figures are for a ubatch
    capped at the context."""
    cfg = config_from_dict(_config("mha"))
    path = save_checkpoint(tmp_path / "run", 1, FelixLM(cfg.model), cfg, {}, tokenizer_path=tokenizer.path)
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(tmp_path / "m.gguf"),
                 "--ubatch-size", "100000", "--kv-context", "1000", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["deployment_memory"]
    assert mem["n_ubatch"] == 1000 and "n_ubatch 1000" in mem["assumes"]
    assert mem == memory_report(cfg.model, context=1000, n_ubatch=1000, adapter=False)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(json.dumps(_config("mha")))
    assert main(["quantize", "--config", str(yaml), "--format", "q8_0", "--kv-context", "1000", "--ubatch-size",
                 "100000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n_ubatch"] == 1000 and report["compute_buffer_bytes"] == compute_buffer_bytes(cfg.model, 1000, 1000)


def test_the_default_kv_budget_past_max_seq_len_gets_a_note(tokenizer, tmp_path, capsys):
    """Before: only an explicit --kv-context past max_seq_len got the note, not the default 2048."""
    cfg = config_from_dict(_config("mha"))
    assert cfg.model.max_seq_len < 2048
    path = save_checkpoint(tmp_path / "run", 1, FelixLM(cfg.model), cfg, {}, tokenizer_path=tokenizer.path)
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(tmp_path / "m.gguf")]) == 0
    err = capsys.readouterr().err
    assert (f"note: the default KV context 2048 (--kv-context {cfg.model.max_seq_len} budgets the model's own) is "
            f"past the model's max_seq_len {cfg.model.max_seq_len}") in err
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(tmp_path / "m.gguf"),
                 "--kv-context", str(cfg.model.max_seq_len)]) == 0
    assert "note" not in capsys.readouterr().err
