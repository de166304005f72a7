"""FLOPs, memory and the info/plan/bench commands: counted from the model, checked against independent sums."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from felix.cli import main
from felix.config import config_from_dict
from felix.flops import datasheet_peak, flops_per_token, measure_matmul_peak, mfu, peak_flops
from felix.memory import measure_step_memory, rss_step_memory, train_memory_bytes
from felix.model import FelixLM

SMALL = {"model": {"vocab_size": 2048, "n_layers": 3, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "d_ff": 352,
                   "max_seq_len": 256, "splice_every": 2, "splice_rank": 8},
         "train": {"seq_len": 256, "micro_batch_size": 4, "dtype": "fp32", "threads": 2}}


def analytic_flops(cfg, seq_len: int) -> int:
    """6 x (matmul weights, the tied LM head included) + 12 L d T for attention scores and values (PaLM)."""
    m = FelixLM(cfg)
    matmul = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2)  # tok_emb counts once, as the head
    return 6 * matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


@pytest.mark.parametrize("seq_len", [64, 256])
def test_flops_per_token_matches_the_analytic_count(seq_len):
    cfg = config_from_dict(SMALL).model
    counted = flops_per_token(cfg, seq_len)
    assert counted == pytest.approx(analytic_flops(cfg, seq_len), rel=0.03)
    # Counted on a meta copy: a real model gives the same number and its weights are untouched.
    model = FelixLM(cfg)
    before = model.tok_emb.weight.clone()
    assert flops_per_token(model, seq_len) == counted
    assert torch.equal(model.tok_emb.weight, before)


def test_flops_grow_with_context_by_the_attention_term():
    cfg = config_from_dict(SMALL).model
    delta = flops_per_token(cfg, 256) - flops_per_token(cfg, 128)
    assert delta == pytest.approx(12 * cfg.n_layers * cfg.d_model * 128, rel=0.01)
    with pytest.raises(ValueError, match=r"seq_len must be in \[1, 256\], got 257"):
        flops_per_token(cfg, 257)


def test_peaks_and_mfu():
    value, source = peak_flops(torch.device("cpu"), torch.float32)
    assert value > 1e9 and source.startswith("measured matmul peak")
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == ("NVIDIA H100 SXM", 989.4e12)
    assert datasheet_peak("NVIDIA H100 PCIe")[0] == "NVIDIA H100 PCIe"
    assert datasheet_peak("AMD Radeon RX 7800 XT")[1] == pytest.approx(74.65e12)
    assert datasheet_peak("Some Future GPU") is None
    assert mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    assert mfu(1000.0, 6e9, None) is None


@pytest.mark.slow  # fp16 products, emulated on most CPUs: ~7 s
def test_the_cpu_peak_is_the_devices_best_not_an_emulated_dtypes():
    """Against the peak of fp16 as this CPU emulates it (a few GFLOP/s), fp16 training read 448% MFU."""
    fp32 = measure_matmul_peak(torch.device("cpu"), torch.float32)
    value, source = peak_flops(torch.device("cpu"), torch.float16)
    assert value >= fp32
    slower = measure_matmul_peak(torch.device("cpu"), torch.float16) < fp32
    assert source == ("measured matmul peak (cpu, fp32, faster than fp16)" if slower else
                      "measured matmul peak (cpu, fp16)")


@pytest.mark.slow  # a subprocess: ~17 s on 2 idle cores
def test_predicted_memory_equals_a_real_step_and_the_kernels_rss():
    """Fake-tensor prediction == the same tracker on real tensors, and within 15% of the kernel's RSS peak."""
    cfg = config_from_dict(SMALL)
    predicted = train_memory_bytes(cfg, "fp32", device_type="cpu")
    params = FelixLM(cfg.model).num_params()
    assert predicted > 16 * params  # weights, grads, two AdamW moments, plus activations
    assert measure_step_memory(cfg, torch.device("cpu"), torch.float32) == predicted
    rss = rss_step_memory(cfg, "fp32")
    assert rss == pytest.approx(predicted, rel=0.15)


def test_memory_follows_checkpointing_dtype_and_batch():
    cfg = config_from_dict(SMALL)
    base = train_memory_bytes(cfg, "fp32")
    ckpt = train_memory_bytes(config_from_dict(SMALL | {"train": SMALL["train"] | {"activation_checkpointing": True}}),
                              "fp32")
    bigger = train_memory_bytes(config_from_dict(SMALL | {"train": SMALL["train"] | {"micro_batch_size": 8}}), "fp32")
    assert ckpt < base < bigger
    static = 16 * FelixLM(cfg.model).num_params()
    # Activations scale with the batch: doubling it roughly doubles what is above the static part.
    assert (bigger - static) / (base - static) == pytest.approx(2.0, rel=0.25)
    with pytest.raises(ValueError, match="dtype must be one of .*got 'int8'"):
        train_memory_bytes(cfg, "int8")


# -- the commands --------------------------------------------------------------------------------------

def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    raw = {"model": {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
                     "splice_every": 2, "splice_rank": 4},
           "train": {"seq_len": 32, "micro_batch_size": 2, "dtype": "fp32", "threads": 2}}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_info_json(capsys, tiny_config):
    info = run_json(capsys, "info", "--config", str(tiny_config), "--json")
    model = FelixLM(config_from_dict(yaml.safe_load(tiny_config.read_text())).model)
    assert info["params"] == model.num_params() and info["splice_params"] == model.num_splice_params() == 4 * 192
    assert info["flops_per_token"] == flops_per_token(model, 32)
    assert info["train_memory_bytes"] > 16 * info["params"]
    assert (info["n_layers"], info["d_model"], info["seq_len"]) == (2, 64, 32)
    # overrides apply
    info2 = run_json(capsys, "info", "--config", str(tiny_config), "--json", "train.seq_len=64")
    assert info2["flops_per_token"] > info["flops_per_token"] and info2["seq_len"] == 64


def test_plan_json(capsys, tiny_config):
    p = run_json(capsys, "plan", "--config", str(tiny_config), "--tok-per-s", "1000", "--json")
    assert p["throughput_source"].startswith("given")
    assert p["tokens_20"] == 20 * p["params"] and p["tokens_100"] == 100 * p["params"]
    assert p["days_20"] == pytest.approx(20 * p["params"] / 1000 / 86400)
    assert p["days_100"] == pytest.approx(5 * p["days_20"])
    g = run_json(capsys, "plan", "--config", str(tiny_config), "--gpu", "RX 7800 XT", "--mfu", "0.25", "--json")
    assert g["tok_per_s"] == pytest.approx(74.65e12 * 0.25 / g["flops_per_token"])
    assert "RX 7800 XT" in g["throughput_source"]
    assert main(["plan", "--config", str(tiny_config), "--gpu", "RX 7800 XT"]) == 2  # --mfu missing
    assert main(["plan", "--config", str(tiny_config), "--gpu", "TPU v9", "--mfu", "0.3"]) == 2


def test_plan_measures_throughput_when_not_given(capsys, tiny_config):
    assert main(["plan", "--config", str(tiny_config), "--bench-steps", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    p = json.loads(out)
    assert p["throughput_source"].startswith("measured here") and p["tok_per_s"] > 0
    assert "felix plan: measuring throughput here: 3 training steps of this config" in err  # not a silent wait


def test_bench_train_json_smoke(capsys, tiny_config):
    r = run_json(capsys, "bench", "train", "--config", str(tiny_config), "--steps", "2", "--warmup", "1",
                 "--compare-hf", "--json")
    assert r["tok_per_s"] > 0 and r["hf_tok_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["tok_per_s"] / r["hf_tok_per_s"])
    assert 0 < r["mfu"] < 1 and r["peak_memory_bytes"] > 16 * r["params"]
    assert r["dtype"] == "fp32" and r["device"].startswith("cpu")
    assert r["flops_per_token"] == flops_per_token(config_from_dict(yaml.safe_load(tiny_config.read_text())).model, 32)
