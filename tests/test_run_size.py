"""What a user planning a long run reads first: `felix info` and `felix plan` size the configured run (tokens per
step and in all, days, bytes per checkpoint and on disk), checked against checkpoints really written; an unknown
--gpu names the known ones; a resume whose data moved says how to point it at the new place."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import write_config

from felix import checkpoint as ckpt_io
from felix import memory
from felix.checkpoint import checkpoint_tensors, latest_checkpoint, list_checkpoints, save_checkpoint
from felix.cli import main
from felix.commands import info
from felix.config import load_config
from felix.flops import GPU_PEAK_FLOPS
from felix.model import FelixLM
from felix.optim import build_optimizer

TINY = {"model": {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
                  "splice_every": 2, "splice_rank": 4},
        "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum_steps": 3, "max_steps": 500, "keep_last": 4,
                  "dtype": "fp32", "threads": 2}}


@pytest.fixture
def tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def run_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def payload_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_checkpoint_bytes_are_what_a_checkpoint_of_the_demo_config_holds(tmp_path):
    """The formula against a real save (weights, AdamW's state after a step) of the packaged demo config, and
    felix-300m's figure is the same bytes per parameter: ~12 (fp32 weights and two fp32 moments), 5.24 GB."""
    cfg = load_config("demo")
    model = FelixLM(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, model, cfg, {}, optimizer)
    tensors = sum(t.numel() * t.element_size() for t in checkpoint_tensors(model, optimizer))
    assert payload_bytes(path / "model.safetensors") + payload_bytes(path / "optimizer.safetensors") == tensors
    # the trainer's figure: the tensors exactly and a bound on headers, RNG state and trainer.json (the demo config
    # names no tokenizer file, so none is counted, and none was copied)
    expected = memory.checkpoint_bytes(cfg)
    assert tensors < dir_bytes(path) <= expected <= tensors + 512 * 1024
    ratio = tensors / model.num_params()
    assert ratio == pytest.approx(12, rel=1e-4)

    big = load_config("felix-300m")
    with torch.device("meta"):
        params = FelixLM(big.model).num_params()
    assert memory.checkpoint_bytes(big) / params == pytest.approx(ratio, rel=1e-4)
    assert memory.checkpoint_bytes(big) == pytest.approx(5.24e9, rel=1e-3)
    size = info.run_size(big)  # 230,000 steps x 4 x 16 x 2048
    assert (size["tokens_per_step"], size["run_tokens"]) == (131_072, 230_000 * 131_072)
    # keep_last 3, the one being written, the rollback target and the next one (which may sit beside keep_last newer
    # ones: the target counted since it was found missing, the next one since it is kept) and the milestones at 50k,
    # 100k, 150k and 200k (keep_every 50000)
    assert size["milestones"] == 4 and size["run_disk_bytes"] == 10 * memory.checkpoint_bytes(big)
    nearly_done = info.run_size(load_config("felix-300m", ["train.max_steps=200_500"]))  # 200k among the last 3
    assert nearly_done["milestones"] == 3


def test_a_trained_run_stays_within_the_disk_info_predicts(tmp_path, tiny_mix, monkeypatch):
    """The trainer's own checkpoints: each within the bytes info predicts, which are the trainer's own figure, and
    never more of them on disk at once than info counts. keep_last 1, a checkpoint every 5 steps and healthy_steps
    20: while step 30 is written, the rollback target (5, proven by step 25) and the next one (20, the oldest since,
    proven at 40) sit beside step 25, keep_last + 3, where info and the trainer's warning once counted keep_last + 1,
    then keep_last + 2. The last step ends the run: the next one is let go (a resume starts from step 35)."""
    from felix.trainer import Trainer

    at_once = []
    prune = ckpt_io.prune_checkpoints  # every write ends in a prune: what is on disk then is the most at once

    def counting(run_dir, *args, **kwargs):
        at_once.append(len(list_checkpoints(run_dir)))
        return prune(run_dir, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "prune_checkpoints", counting)
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=35, ckpt_every=5, keep_last=1, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    size = info.run_size(cfg)
    assert trainer.ckpt_bytes == memory.checkpoint_bytes(cfg) == size["checkpoint_bytes"]
    trainer.run()
    assert max(at_once) == 4 and size["run_disk_bytes"] == 4 * trainer.ckpt_bytes
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000005", "step-00000035"]
    for path in kept:
        tensors = payload_bytes(path / "model.safetensors") + payload_bytes(path / "optimizer.safetensors")
        assert tensors < dir_bytes(path) <= trainer.ckpt_bytes


def test_info_and_plan_size_the_configured_run(capsys, tiny_config):
    cfg = load_config(tiny_config)
    i = run_json(capsys, "info", "--config", tiny_config, "--json")
    assert i["tokens_per_step"] == 2 * 3 * 32 and i["max_steps"] == 500
    assert i["run_tokens"] == 500 * 192
    assert i["checkpoint_bytes"] == memory.checkpoint_bytes(cfg) and i["keep_last"] == 4
    # keep_last 4, one being written, the rollback target and the next one
    assert i["run_disk_bytes"] == 7 * i["checkpoint_bytes"]
    p = run_json(capsys, "plan", "--config", tiny_config, "--tok-per-s", "1000", "--json", "train.max_steps=900")
    assert p["run_tokens"] == 900 * 192 and p["tokens_per_step"] == 192
    assert p["run_days"] == pytest.approx(900 * 192 / 1000 / 86400)
    assert (p["checkpoint_bytes"], p["run_disk_bytes"]) == (i["checkpoint_bytes"], i["run_disk_bytes"])

    assert main(["plan", "--config", tiny_config, "--tok-per-s", "1000"]) == 0
    text = capsys.readouterr().out
    assert "tokens per step  192 (batch 2 x seq 32 x grad accumulation 3" in text
    assert re.search(r"configured run +500 steps = 96\.00k tokens = 0\.0 days", text)
    assert re.search(r"checkpoint disk +[\d.]+ GiB at most \(7 checkpoints: keep_last 4 \+ 1 being written \+ the "
                     r"rollback target and the next one\)", text), text
    assert main(["info", "--config", tiny_config]) == 0
    assert "configured run        500 steps = 96.00k tokens" in capsys.readouterr().out


def test_an_unknown_gpu_is_refused_with_the_known_names_before_the_count(capsys, tiny_config, monkeypatch):
    def no_count(cfg):
        raise AssertionError("the model was counted before the flags were checked")

    monkeypatch.setattr(info, "model_info", no_count)
    assert main(["plan", "--config", tiny_config, "--gpu", "RX 9070", "--mfu", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--gpu 'RX 9070': not in the datasheet table" in err
    assert all(name in err for _, name, _ in GPU_PEAK_FLOPS)


def test_a_resume_after_the_data_moved_says_how_to_point_at_it(tmp_path, tiny_mix, capsys):
    data, moved, run = tmp_path / "data", tmp_path / "moved", tmp_path / "run"
    shutil.copytree(tiny_mix.root, data)
    cfg_path = write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0)
    assert main(["train", "--config", str(cfg_path), "--out", str(run), "--no-progress",
                 f"data.tokenizer={data / 'tokenizer.json'}", f"data.mix={data / 'mix.yaml'}"]) == 0
    data.rename(moved)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer not found: {data / 'tokenizer.json'} (data.tokenizer)" in err
    assert f"data mix not found: {data / 'mix.yaml'} (data.mix)" in err
    # the suggested command, with NEW where the data now is, resumes the run
    fix = re.search(rf"felix train --out {re.escape(str(run))} --resume (.*)$", err.strip()).group(1)
    assert fix == "data.tokenizer=NEW/tokenizer.json data.mix=NEW/mix.yaml"
    overrides = fix.replace("NEW", str(moved)).split()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "train.max_steps=3", *overrides]) == 0
    assert latest_checkpoint(run).name == "step-00000003"
    assert load_config(run / "config.yaml").data.tokenizer == str(moved / "tokenizer.json")


def test_plan_ranks_scales_tokens_and_days_and_says_it_assumes_linear_scaling(capsys, tiny_config):
    """Before, `felix plan` planned one process only: a torchrun run's tokens per step and days were off by N."""
    one = run_json(capsys, "plan", "--config", tiny_config, "--tok-per-s", "1000", "--json")
    four = run_json(capsys, "plan", "--config", tiny_config, "--tok-per-s", "1000", "--ranks", "4", "--json")
    assert one["ranks"] == 1 and four["ranks"] == 4 and four.keys() == one.keys()
    assert four["tokens_per_step"] == 4 * one["tokens_per_step"] == 4 * 192
    assert four["run_tokens"] == 4 * one["run_tokens"] == 4 * 500 * 192
    assert four["tok_per_s"] == 1000 and four["total_tok_per_s"] == 4000
    # the same steps take as long (each rank does its own share); a token budget takes a quarter of the time
    assert four["run_days"] == pytest.approx(one["run_days"]) == pytest.approx(4 * 500 * 192 / 4000 / 86400)
    assert four["days_20"] == pytest.approx(one["days_20"] / 4)
    assert (four["train_memory_bytes"], four["checkpoint_bytes"]) == (one["train_memory_bytes"],
                                                                      one["checkpoint_bytes"])
    assert main(["plan", "--config", tiny_config, "--tok-per-s", "1000", "--ranks", "4"]) == 0
    text = capsys.readouterr().out
    assert "tokens per step  768 (batch 2 x seq 32 x grad accumulation 3 x 4 ranks)" in text
    assert "4,000 tok/s = 4 ranks x 1,000 tok/s (given (--tok-per-s)); assumes linear scaling" in text
    with pytest.raises(SystemExit):
        main(["plan", "--config", tiny_config, "--tok-per-s", "1000", "--ranks", "0"])
    assert "argument --ranks: must be at least 1, got 0" in capsys.readouterr().err
