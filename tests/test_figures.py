"""Planning figures (`felix plan`, `felix bench`, the GPU peak table): regressions found in review."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from felix.cli import main
from felix.config import config_from_dict
from felix.flops import GPU_PEAK_FLOPS, datasheet_peak

TINY = {"model": {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
                  "splice_every": 2, "splice_rank": 4},
        "train": {"seq_len": 32, "micro_batch_size": 2, "dtype": "fp32", "threads": 2}}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_plan_refuses_a_non_finite_or_non_positive_tok_per_s(capsys, tiny_config, value):
    # NaN passed `tok_per_s <= 0` and printed "days_20": NaN (invalid JSON); inf printed 0 days.
    assert main(["plan", "--config", tiny_config, f"--tok-per-s={value}", "--json"]) == 2
    captured = capsys.readouterr()
    assert "--tok-per-s" in captured.err and captured.out == ""


def test_plan_refuses_mfu_beside_tok_per_s(capsys, tiny_config):
    # --mfu without --gpu was silently dropped when --tok-per-s was given.
    assert main(["plan", "--config", tiny_config, "--tok-per-s", "1000", "--mfu", "0.3", "--json"]) == 2
    assert "not both" in capsys.readouterr().err


def test_plan_checks_bench_steps_by_its_own_name_before_counting(capsys, tiny_config, monkeypatch):
    import felix.commands.info as info

    def no_count(cfg):
        raise AssertionError("the model was counted before the flags were checked")

    monkeypatch.setattr(info, "model_info", no_count)
    assert main(["plan", "--config", tiny_config, "--bench-steps", "0", "--json"]) == 2
    assert "--bench-steps" in capsys.readouterr().err  # was "--steps", a flag plan does not have


def test_datasheet_table_entries_are_not_shadowed():
    # Matching is by substring, first hit wins: a key that contains an earlier key is unreachable.
    for key, name, flops in GPU_PEAK_FLOPS:
        assert datasheet_peak(f"NVIDIA {key.upper()}") == (name, flops), key
    assert datasheet_peak("NVIDIA GH200 480GB") == ("NVIDIA GH200", 989.4e12)
    assert datasheet_peak("NVIDIA H200 NVL") == ("NVIDIA H200 NVL", 835.5e12)
    assert datasheet_peak("NVIDIA H200") == ("NVIDIA H200", 989.4e12)


def test_bench_peak_memory_is_taken_before_the_hf_copy_exists(monkeypatch):
    """--compare-hf: FelixLM's peak is measured with no HF model alive (on CUDA, max_memory_allocated
    counts every live tensor, so an HF copy made first added its fp32 weights to FelixLM's figure)."""
    import felix.commands.bench as bench
    import felix.hf_convert as hf_convert

    events: list[str] = []
    real_peak, real_copy = bench._cpu_step_peak, hf_convert.to_hf_model
    monkeypatch.setattr(bench, "_cpu_step_peak", lambda runner: events.append("peak") or real_peak(runner))
    monkeypatch.setattr(hf_convert, "to_hf_model", lambda model: events.append("hf") or real_copy(model))
    cfg = config_from_dict(TINY)
    r = bench.bench_train(cfg, steps=1, warmup=1, compare_hf=True)
    assert events == ["peak", "hf"]
    assert r["hf_tok_per_s"] > 0 and r["peak_memory_bytes"] > 16 * r["params"]



def test_json_output_spells_non_finite_numbers_as_null(capsys):
    """json.dumps writes NaN and Infinity, which strict JSON readers refuse: the --json contract is one
    valid JSON object."""
    from felix.cli import print_json

    print_json({"loss": float("nan"), "rows": [1.5, float("inf"), {"x": -float("inf")}], "n": 3})
    line = capsys.readouterr().out.strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == \
        {"loss": None, "rows": [1.5, None, {"x": None}], "n": 3}


@pytest.mark.parametrize("accum", [1, 4])
def test_bench_charges_the_optimizer_step_once_per_accumulation_window(monkeypatch, accum):
    """The trainer steps AdamW once every grad_accum_steps micro-batches; the bench stepped it on every
    micro-batch, so configs with accumulation were timed slow. A 0.2 s optimizer step makes it visible."""
    import time

    import felix.commands.bench as bench
    import felix.optim

    real = felix.optim.build_optimizer

    def slow_optimizer(*args, **kwargs):
        opt = real(*args, **kwargs)
        step = opt.step
        opt.step = lambda *a, **k: (time.sleep(0.2), step(*a, **k))[1]
        return opt

    monkeypatch.setattr(felix.optim, "build_optimizer", slow_optimizer)
    cfg = config_from_dict(TINY | {"train": TINY["train"] | {"grad_accum_steps": accum}})
    r = bench.bench_train(cfg, steps=3, warmup=1)
    seconds = r["micro_batch_size"] * r["seq_len"] / r["tok_per_s"]  # per micro-batch, as trained
    assert all(o >= 0.2 for o in r["optimizer_seconds"]) and r["grad_accum_steps"] == accum
    whole = statistics.median(r["step_seconds"])
    if accum == 1:
        assert seconds == pytest.approx(whole, rel=1e-9)
    else:  # each step is charged at most 0.05 of its 0.2 s optimizer step (bounds that hold under any load)
        assert seconds <= whole - 0.15 and seconds > 0.05


def test_gpu_memory_prediction_holds_the_gpus_loss_chunk():
    """The prediction runs on CPU fake tensors, and the fused loss sized its logits chunk for the CPU (64 rows
    at vocab 32K, 8 MiB) where a GPU makes 1,024 rows at a time (128 MiB of fp32 logits)."""
    from felix.memory import train_memory_bytes
    from felix.model import loss_chunk_rows

    cfg = config_from_dict({"model": {"vocab_size": 32768, "n_layers": 1, "d_model": 64, "n_heads": 4, "d_ff": 128,
                                      "max_seq_len": 1024, "splice_every": 1, "splice_rank": 4},
                            "train": {"seq_len": 1024, "micro_batch_size": 4}})
    gpu_chunk, cpu_chunk = (loss_chunk_rows(32768, d) * 32768 * 4 for d in ("cuda", "cpu"))
    assert gpu_chunk == 128 * 2**20 and cpu_chunk == 8 * 2**20
    assert train_memory_bytes(cfg, "bf16", "cuda") - train_memory_bytes(cfg, "bf16", "cpu") >= gpu_chunk - cpu_chunk


@pytest.mark.parametrize("accum", [1, 4])
def test_bench_train_peak_memory_is_a_whole_optimizer_step_with_its_accumulation(accum):
    """`felix bench train` measured one micro-batch stepped alone: with grad accumulation the trainer's later
    micro-batches run with the gradients alive, and it reported up to their size less than `felix bench memory`
    and `felix info` (felix-50m at seq 256: 983 MB against 1,110 MB)."""
    import torch

    import felix.commands.bench as bench
    from felix.memory import measure_step_memory
    from felix.model import FelixLM

    cfg = config_from_dict(TINY | {"train": TINY["train"] | {"grad_accum_steps": accum}})
    r = bench.bench_train(cfg, steps=1, warmup=1)
    grads = 4 * FelixLM(cfg.model).num_params()
    # the same tracker over the steps felix.memory runs (bench memory); they differ by the bench's token batch
    assert r["peak_memory_bytes"] == pytest.approx(measure_step_memory(cfg, torch.device("cpu"), torch.float32),
                                                   abs=grads / 20)
    assert ("2 micro-batches (grad accumulation)" in r["peak_memory_source"]) == (accum > 1)


def test_bench_train_and_plan_time_quails_objective(capsys, tmp_path):
    """`felix bench train` stepped the bare model: its peak memory and tok/s were the same with quail.enabled and
    quail.ste (whose second, fake-quantized forward the trainer pays ~2.6x for), and so was plan's measurement."""
    import torch

    import felix.commands.bench as bench
    from felix.memory import measure_step_memory

    quail = {"enabled": True, "tokens": ["<|endoftext|>"], "ste": True}
    plain = bench.bench_train(config_from_dict(TINY), steps=1, warmup=1)
    ste_cfg = config_from_dict(TINY | {"quail": quail})
    ste = bench.bench_train(ste_cfg, steps=1, warmup=1)
    # the step's peak holds the quantized pass, as `felix bench memory` measures it (batches differ: not equal)
    assert ste["peak_memory_bytes"] > 1.2 * plain["peak_memory_bytes"]
    assert ste["peak_memory_bytes"] == pytest.approx(measure_step_memory(ste_cfg, torch.device("cpu"), torch.float32),
                                                     rel=0.1)
    assert plain["quail"] == {"enabled": False} and ste["quail"]["enabled"] and ste["quail"]["ste"]
    assert ste["quail"]["calibration_seconds"] > 0  # timed apart
    assert ste["quail"]["calibrate_every"] == ste_cfg.quail.calibrate_every
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    overrides = ["quail.enabled=true", 'quail.tokens=["<|endoftext|>"]', "quail.ste=true", "quail.margin=1.5"]
    assert main(["bench", "train", "--config", str(path), "--steps", "1", "--warmup", "0", *overrides]) == 0
    out = capsys.readouterr().out
    assert "QUAIL on: its hinge (quail.ste: a second, rq4-fake-quantized forward)" in out and "calibration" not in out
    assert main(["plan", "--config", str(path), "--bench-steps", "1", "--json", *overrides]) == 0
    p = json.loads(capsys.readouterr().out)
    assert "QUAIL on" in p["throughput_source"] and p["quail"]["ste"]


def test_memory_assumption_says_fp32_runs_without_autocast_and_on_a_gpu():
    """`felix info` labelled an fp32 prediction "fp32 autocast": fp32 runs no autocast (felix.device.autocast)."""
    from felix.commands.info import model_info

    fp32 = model_info(config_from_dict(TINY))["train_memory_assumes"]
    bf16 = model_info(config_from_dict(TINY | {"train": TINY["train"] | {"dtype": "bf16"}}))["train_memory_assumes"]
    assert fp32.startswith("fp32, no autocast, fp32 weights") and "fp32 autocast" not in fp32
    assert bf16.startswith("bf16 autocast, fp32 weights")
    assert all("a GPU's live tensors, not its runtime context" in text for text in (fp32, bf16))


def test_bench_memory_help_says_what_its_prediction_is():
    """It promised a comparison "term by term" (it prints totals) against `felix info`'s figure, which is a GPU's:
    on a CPU bench memory predicts for the CPU's loss chunk and dtype (demo: 366 MB there, 425 MB in info)."""
    from felix.cli import build_parser

    bench = next(a for a in build_parser("bench")._actions if a.choices and "bench" in a.choices).choices["bench"]
    memory = next(a for a in bench._actions if a.choices and "memory" in a.choices).choices["memory"]
    assert "term by term" not in memory.description
    assert "on this device" in memory.description and "`felix info` predicts for a GPU" in memory.description


def test_under_ddp_a_rank_holds_one_copy_of_the_gradients(capsys, tiny_config):
    """DDP's default keeps a flat fp32 copy of every gradient for the all-reduce beside `.grad` (4 bytes a
    parameter more per rank than one process: 1.63 GiB at felix-300m). The trainer's DDP holds the gradients in
    those buckets through accumulated steps, so `plan --ranks N`'s figure per rank, one process's, holds."""
    import torch
    import torch.distributed as dist

    from felix.distributed import DistInfo, frees_gradients, wrap_ddp
    from felix.model import FelixLM

    torch.manual_seed(0)
    model = FelixLM(config_from_dict(TINY).model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        info = DistInfo(rank=0, world_size=2)  # a rank's settings under torchrun; the group here is one process
        ddp = wrap_ddp(model, info, torch.device("cpu"))
        buckets = ddp._get_ddp_logging_data()["bucket_sizes"]

        def in_buckets() -> bool:
            storages = {p.grad.untyped_storage().data_ptr() for p in params}
            return len(storages) == len(str(buckets).split(",")) < len(params)  # the buckets', none apart

        for step in range(3):  # optimizer steps of two micro-batches each, the first under no_sync
            with ddp.no_sync():
                ddp(torch.randint(0, 64, (2, 16))).float().mean().backward()
            # from the second step on, accumulating outside the buckets would hold a second copy
            assert in_buckets() or step == 0
            ddp(torch.randint(0, 64, (2, 16))).float().mean().backward()
            assert in_buckets()
            optimizer.step()
            optimizer.zero_grad(set_to_none=frees_gradients(info))  # as the trainer does
    finally:
        dist.destroy_process_group()

    capsys.readouterr()
    assert main(["plan", "--config", tiny_config, "--tok-per-s", "1000", "--ranks", "2"]) == 0
    assert "per rank" in capsys.readouterr().out
