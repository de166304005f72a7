"""--kv-context: the deployment memory of `felix quantize` / `felix export` budgeted at a chosen context."""

from __future__ import annotations

import json

import pytest

from felix.cli import main
from felix.config import config_from_dict, load_config
from felix.errors import FelixError
from felix.export_memory import deployment_memory, memory_report
from felix.llama_memory import KV_CONTEXT, VRAM_CAP_BYTES, kv_cache_bytes

# max_seq_len 64: every context here past it gets the note
CONFIG = {"model": {"vocab_size": 320, "n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 256, "max_seq_len": 64},
          "train": {"seq_len": 64}}
TIMING = ("quantize_seconds", "quantize_cpu_seconds", "write_seconds", "seconds")


def _quantize(capsys, tmp_path, *extra: str) -> tuple[int, str, str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(CONFIG))
    rc = main(["quantize", "--config", str(cfg), "--format", "q8_0", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _report(out: str) -> dict:
    return {k: v for k, v in json.loads(out.strip().splitlines()[-1]).items() if k not in TIMING}


def _without_kv(report: dict) -> dict:
    # the compute buffer holds the attention mask (and scores), which grow with the context too
    changed = ("kv_context", "kv_cells", "kv_cache_bytes", "compute_buffer_bytes", "deployment_bytes")
    return {k: v for k, v in report.items() if k not in changed}


def test_quantize_budgets_the_kv_cache_at_the_asked_context(tmp_path, capsys):
    model = config_from_dict(CONFIG).model
    rc, out, err = _quantize(capsys, tmp_path, "--json")
    default = _report(out)
    # the default budget is past this model's max_seq_len too, and says so (before: only an asked-for one did)
    assert rc == 0 and "note: the default KV context 2048 (--kv-context 64 budgets the model's own) is past the " \
        "model's max_seq_len 64" in err
    assert default["kv_context"] == KV_CONTEXT == 2048 and default["kv_cache_bytes"] == kv_cache_bytes(model, 2048)
    rc, out, err = _quantize(capsys, tmp_path, "--json", "--kv-context", "8192")
    asked = _report(out)
    assert rc == 0 and asked["kv_context"] == 8192
    assert asked["kv_cache_bytes"] == kv_cache_bytes(model, 8192) == 4 * default["kv_cache_bytes"]
    assert asked["deployment_bytes"] == (asked["weight_bytes"] + asked["kv_cache_bytes"]
                                         + asked["compute_buffer_bytes"] + asked["output_buffer_bytes"])
    assert asked["compute_buffer_bytes"] > default["compute_buffer_bytes"]
    assert _without_kv(asked) == _without_kv(default)
    assert "--kv-context 8192 is past the model's max_seq_len 64" in err
    # the default given explicitly: the same figures
    rc, out, _ = _quantize(capsys, tmp_path, "--json", "--kv-context", "2048")
    assert _report(out) == default


def test_a_context_past_the_cap_is_reported_over_it(tmp_path, capsys):
    model = config_from_dict(CONFIG).model
    per_position = kv_cache_bytes(model, 256) // 256  # llama.cpp allocates whole blocks of 256 cells
    context = VRAM_CAP_BYTES // per_position  # the KV cache alone fills the cap; the weights tip it over
    rc, out, _ = _quantize(capsys, tmp_path, "--json", "--kv-context", str(context))
    report = _report(out)
    assert rc == 0 and report["kv_cache_bytes"] == VRAM_CAP_BYTES and not report["fits_vram_cap"]
    rc, out, _ = _quantize(capsys, tmp_path, "--kv-context", str(context))
    assert rc == 0 and f"KV at {context} ctx; OVER the 4 GiB cap" in out


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", ""])
def test_a_bad_kv_context_is_an_error_naming_the_flag(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        _quantize(capsys, tmp_path, "--kv-context", value)
    assert exc.value.code == 2 and "argument --kv-context" in capsys.readouterr().err
    out = tmp_path / "m.gguf"
    with pytest.raises(SystemExit) as exc:  # refused before the export writes anything
        main(["export", "gguf", "--checkpoint", str(tmp_path), "--out", str(out), "--kv-context", value])
    assert exc.value.code == 2 and "argument --kv-context" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, default", [(["quantize"], f"default {KV_CONTEXT}"),
                                           (["export", "gguf"], f"default {KV_CONTEXT}"),
                                           (["export", "hf"], "default the model's max_seq_len")])
def test_help_shows_the_flag_and_its_default(capsys, argv, default):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "--kv-context N" in text and default in text


def test_memory_report_at_a_context():
    m300 = load_config("felix-300m").model
    default, asked = memory_report(), memory_report(context=32768)
    assert default["context"] == 2048 and asked["context"] == 32768
    for dtype, row in asked["models"]["felix-300m"].items():
        base = default["models"]["felix-300m"][dtype]
        assert row["kv_cache_bytes"] == kv_cache_bytes(m300, 32768) == 16 * base["kv_cache_bytes"]
        grown = ("kv_cache_bytes", "compute_buffer_bytes")  # the scores and mask grow with the context too
        assert row["total_bytes"] - base["total_bytes"] == sum(row[k] - base[k] for k in grown)
        assert row["fits_cap"] == (row["total_bytes"] <= VRAM_CAP_BYTES)
    # 24 layers x 1024 x 32768 positions x K and V in fp16 is 3 GiB: f32 weights no longer fit beside it
    assert default["models"]["felix-300m"]["f32"]["fits_cap"] and not asked["models"]["felix-300m"]["f32"]["fits_cap"]
    assert deployment_memory(m300) == default["models"]["felix-300m"]


@pytest.mark.parametrize("context", [0, -1, 2.5, True])
def test_the_library_refuses_a_context_that_is_no_position_count(context):
    model = config_from_dict(CONFIG).model
    with pytest.raises(FelixError, match="KV cache context must be a positive number of positions"):
        kv_cache_bytes(model, context)
    with pytest.raises(FelixError, match="KV cache context"):
        memory_report(model, context=context)
