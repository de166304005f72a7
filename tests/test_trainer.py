"""The trainer end to end on a tiny model: logging, exact resume after SIGKILL, bad-step protection,
gradient accumulation and DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from felix.checkpoint import latest_checkpoint, list_checkpoints
from felix.config import load_config
from felix.metrics import read_metrics
from felix.model_loader import load_model
from felix.trainer import Trainer

TINY = {
    "model": {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
              "max_seq_len": 64, "splice_every": 2, "splice_rank": 4},
    "train": {"seq_len": 32, "micro_batch_size": 4, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2,
              "decay_fraction": 0.3, "eval_every": 6, "eval_batches": 2, "ckpt_every": 3, "keep_last": 2,
              "dtype": "fp32", "threads": 1, "log_every": 1,
              # given, not measured: every trainer start (four per SIGKILL test) would time matmuls for seconds
              "peak_flops": 1e11},
}


def write_config(tmp_path: Path, tiny_mix, **train) -> Path:
    raw = {"model": dict(TINY["model"]), "train": dict(TINY["train"]) | train,
           "data": {"tokenizer": str(tiny_mix.tokenizer_path), "mix": str(tiny_mix.mix_path)}}
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def felix_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "felix", *args]


def test_train_logs_checkpoints_and_learns(tmp_path, tiny_mix, capsys):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=30, eval_every=10))
    result = Trainer(cfg, tmp_path / "run", progress=False).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"step", "loss", "lr", "tokens"} <= r.keys() for r in rows)
    assert rows[-1]["tokens"] == 30 * 4 * 32
    assert rows[0]["loss"] == pytest.approx(math.log(512), abs=0.3)
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 0.5
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [10, 20, 30] and all(r["val_bpb"] > 0 for r in vals)
    assert result.val_loss == vals[-1]["val_loss"]
    # throughput over the steps' time: the three evaluations and ten checkpoint writes are not training
    assert result.tok_per_s == pytest.approx(rows[-1]["tokens"] / sum(r["dt"] for r in rows), rel=1e-9)
    # keep_last 2, and step 3 beside them: the rollback target (proven by step 23; the next one, step 18, would have
    # been at step 38); once, each checkpoint left keep_last before 20 good steps could prove it
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000027", "step-00000030"]
    # the warmup ramps up, the decay ends at min_lr_ratio (0)
    assert rows[0]["lr"] < rows[1]["lr"] == pytest.approx(3e-3)
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    model, tokenizer, ckpt = load_model(latest_checkpoint(tmp_path / "run"))
    assert ckpt.config == cfg and tokenizer.vocab_size <= 512
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the command-line sampler reads the same checkpoint (tokenizer included) and agrees with the library
    from felix.cli import main
    from felix.generate import generate

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "8",
                 "--greedy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = generate(model, tokenizer.encode("def "), 8, greedy=True, stop_ids=tokenizer.stop_ids)
    assert out["completion"] == tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids])


def test_grad_accumulation_matches_larger_micro_batch(tmp_path, tiny_mix):
    a = Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=4, micro_batch_size=4)),
                tmp_path / "a", progress=False)
    b = Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=4, micro_batch_size=2, grad_accum_steps=2)),
                tmp_path / "b", progress=False)
    a.run()
    b.run()
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, tiny_mix):
    # Killed twice: after step 4 (checkpoint 3 is the last), then, resumed, after step 8 (past an
    # evaluation and a keep-last pruning); the twice-resumed run logs the uninterrupted run's losses.
    cfg = write_config(tmp_path, tiny_mix)
    Trainer(load_config(cfg), tmp_path / "ref", progress=False).run()  # in-process: a subprocess only to be killed
    run = tmp_path / "killed"
    train = felix_cmd("train", "--config", str(cfg), "--out", str(run), "--no-progress")
    for kill_after, resume in ((4, []), (8, ["--resume"])):
        proc = subprocess.Popen(train + resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_step(run / "metrics.jsonl", kill_after, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for ckpt in list_checkpoints(run):  # a kill mid-write leaves only a hidden temp dir, never a torn step-N
            assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors"} <= {p.name for p in ckpt.iterdir()}
    Trainer(load_config(cfg), run, resume=True, progress=False).run()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))
    assert losses(run) == losses(tmp_path / "ref")  # bit-exact on CPU
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fault", ["nan", "spike"])
def test_bad_steps_are_skipped_then_rolled_back(tmp_path, tiny_mix, fault):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=10, ckpt_every=4, max_bad_steps=2,
                                   spike_factor=2.0, warmup_steps=1, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(until=4)
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():  # corrupt the live weights the way a bad update would
        w = trainer.model.layers[0].mlp.down_proj.weight
        if fault == "nan":
            w[0, 0] = float("nan")
        else:
            trainer.model.tok_emb.weight.mul_(60.0)
    trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    skipped = [r["step"] for r in rows if "skipped" in r]
    assert skipped == [5, 6], rows
    assert trainer.state.rollbacks == 1 and trainer.state.skipped_steps == 2
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] > 6)
    # after the rollback, training went on from the checkpointed weights, not the corrupted ones
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert rows[6]["loss"] < 2.0 * rows[3]["loss"]
    assert any(not torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("ste", [False, True])
def test_quail_term_is_calibrated_logged_and_trained(tmp_path, tiny_mix, ste):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=8, eval_every=0), [
        # "(": a token of most lines of code, so that 8 steps of 4 windows see whitelisted targets whatever
        # documents the shards hold (a document end is one token in thousands)
        "quail.enabled=true", 'quail.tokens=["<|endoftext|>", "<|end|>", "("]', "quail.gamma=0.5",
        "quail.calibrate_every=4", f"quail.ste={str(ste).lower()}",
        # An untrained model ranks no whitelisted target first, so protect_only would keep the hinge at 0.
        "quail.protect_only=false"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all({"quail_loss", "quail_margin", "quail_positions"} <= r.keys() for r in rows)
    assert all(r["quail_margin"] > 0 for r in rows) and sum(r["quail_positions"] for r in rows) > 0
    # recalibrated at steps 0 and 4 (the margin is measured, so it moves as the weights do)
    margins = [r["quail_margin"] for r in rows]
    assert margins[:4] == [margins[0]] * 4 and margins[4:] == [margins[4]] * 4 and margins[0] != margins[4]
    assert any(r["quail_loss"] > 0 for r in rows)


def test_quail_whitelist_errors_name_the_field(tmp_path, tiny_mix):
    from felix.errors import FelixError

    cfg = load_config(write_config(tmp_path, tiny_mix), ["quail.enabled=true", 'quail.tokens=[" I cannot comply"]'])
    with pytest.raises(FelixError, match="quail.tokens: ' I cannot comply' is"):
        Trainer(cfg, tmp_path / "run", progress=False)


def _finite_checkpoints(run_dir: Path) -> list[str]:
    from felix.checkpoint import load_checkpoint

    return [p.name for p in list_checkpoints(run_dir)
            if all(torch.isfinite(v).all() for v in load_checkpoint(p).model_state.values())]


def test_no_checkpoint_is_written_during_a_bad_streak(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=10, ckpt_every=2, max_bad_steps=2, keep_last=3,
                                   warmup_steps=1, eval_every=0, healthy_steps=3))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(until=3)
    with torch.no_grad():
        trainer.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    trainer.run()
    # step 4 was due but bad: deferred, so the rollback at step 5 restored step 2, not NaN weights; step 6, one good
    # step after the rollback, was put off until the run was healthy again (3 good steps: step 8)
    skipped = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "skipped" in r]
    assert skipped == [4, 5] and trainer.state.rollbacks == 1
    assert _finite_checkpoints(tmp_path / "run") == ["step-00000002", "step-00000008", "step-00000010"]


def test_rollbacks_that_keep_failing_stop_the_run(tmp_path, tiny_mix):
    from felix.errors import FelixError

    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=12, ckpt_every=2, max_bad_steps=2,
                                   max_rollbacks=2, warmup_steps=1, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(until=4)
    # a fault the checkpoint cannot cure: every forward from now on is NaN
    trainer.model.tok_emb.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    with pytest.raises(FelixError, match=r"step 10: training keeps failing after 2 rollback\(s\) to .*step-00000004"):
        trainer.run()
    assert trainer.state.rollbacks == 2
    assert _finite_checkpoints(tmp_path / "run") == ["step-00000002", "step-00000004"]


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, tiny_mix, capsys):
    from felix.cli import main
    from felix.errors import FelixError

    cfg_path = write_config(tmp_path, tiny_mix, max_steps=3, eval_every=3)
    Trainer(load_config(cfg_path), tmp_path / "run", progress=False).run()
    before = [p.name for p in list_checkpoints(tmp_path / "run")]
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(FelixError, match=r"run: already holds checkpoints .*--resume.*new --out"):
        Trainer(load_config(cfg_path, ["train.lr=1e-3"]), tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == before
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml
    # resuming the finished run trains nothing and reports the logged figures as strict JSON (no NaN), the JSON
    # object alone on stdout
    capsys.readouterr()
    argv = ["train", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    summary = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["steps"] == 3 and summary["final_loss"] == rows[-1]["loss"]
    assert summary["val_loss"] == rows[-1]["val_loss"] is not None
    assert summary["trained_steps"] == 0 and summary["max_steps"] == 3
    nothing = f"nothing to train: {tmp_path / 'run'} is at step 3 of max_steps 3"
    assert f"felix train: {nothing}\n" in err
    # said so in words, not as "trained 3 steps ... in 0.0s, 0 tok/s"; the losses to 4 decimals
    assert main(argv) == 0
    assert capsys.readouterr().out == (f"{nothing}; loss {rows[-1]['loss']:.4f}, "
                                       f"val {rows[-1]['val_loss']:.4f}\n")


def test_init_from_with_another_seq_len_names_the_checkpoint(tmp_path, tiny_mix):
    from felix.errors import FelixError

    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0)), tmp_path / "a",
            progress=False).run()
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=4, seq_len=64, eval_every=0))
    with pytest.raises(FelixError, match=r"a/checkpoints/step-00000002: loader state is for seq_len 32, this run "
                                         r"uses 64; .* needs the seq_len, seed and data mix"):
        Trainer(cfg, tmp_path / "b", init_from=tmp_path / "a", progress=False)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tiny_mix):
    # Equal global batch: one process at micro-batch 4, two at 2 each. QUAIL is on with normalize
    # "whitelisted", which divides by the step's count over both ranks (each rank's own count would weigh
    # its positions by how many shared its slice); common tokens, a fixed margin and protect_only off make
    # that count depend on the data alone. Losses, QUAIL terms and validation losses all match (the same six val
    # windows: one batch of four and one of two, or each rank three, in batches of two and one). MFU counts
    # both ranks' tokens against both devices' peaks.
    quail = ["quail.enabled=true", 'quail.tokens=[".", ","]', "quail.margin=1.0", "quail.protect_only=false",
             "quail.normalize=whitelisted", "quail.gamma=2.0"]
    one = write_config(tmp_path, tiny_mix, max_steps=6, micro_batch_size=4, eval_every=3, eval_sequences=6)
    two = write_config(tmp_path, tiny_mix, max_steps=6, micro_batch_size=2, eval_every=3, eval_sequences=6)
    single = subprocess.run(felix_cmd("train", "--config", str(one), "--out", str(tmp_path / "one"), "--no-progress",
                                      *quail), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "felix", "train",
         "--config", str(two), "--out", str(tmp_path / "two"), "--no-progress", "--json", *quail],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rows_one, rows_two = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    summary = json.loads(ddp.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["peak_flops"] == TINY["train"]["peak_flops"]  # given, not measured
    for r in rows_two:
        assert r["tok_per_s"] == pytest.approx(4 * 32 / r["dt"])  # both ranks' tokens
        assert r["mfu"] == pytest.approx(r["tok_per_s"] * summary["flops_per_token"] / (2 * summary["peak_flops"]))
    assert [r["tokens"] for r in rows_one] == [r["tokens"] for r in rows_two]
    counts_one = [r["quail_positions"] for r in rows_one]
    assert sum(counts_one) > 0 and [r["quail_positions"] for r in rows_two] == counts_one
    assert [r["quail_loss"] for r in rows_two] == pytest.approx([r["quail_loss"] for r in rows_one], abs=2e-5)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=2e-5)
    val_one = [r["val_loss"] for r in rows_one if "val_loss" in r]
    val_two = [r["val_loss"] for r in rows_two if "val_loss" in r]
    assert len(val_one) == 2 and val_two == pytest.approx(val_one, abs=2e-5)


def test_quail_whitelisted_normalization_accumulates_like_one_batch(tmp_path, tiny_mix):
    # The step's mean hinge over its whitelisted positions, however they fall into micro-batches.
    quail = ["quail.enabled=true", 'quail.tokens=[".", ","]', "quail.margin=1.0", "quail.protect_only=false",
             "quail.normalize=whitelisted", "quail.gamma=2.0"]
    runs = {}
    for name, mb, accum in (("whole", 4, 1), ("split", 1, 4)):
        cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=4, micro_batch_size=mb, grad_accum_steps=accum,
                                       eval_every=0), quail)
        Trainer(cfg, tmp_path / name, progress=False).run()
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    whole, split = runs["whole"], runs["split"]
    assert [r["quail_positions"] for r in split] == [r["quail_positions"] for r in whole]
    assert sum(r["quail_positions"] for r in whole) > 0
    assert [r["quail_loss"] for r in split] == pytest.approx([r["quail_loss"] for r in whole], abs=1e-5)
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in whole], abs=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, tiny_mix):
    # train.compile on the CPU (inductor's C++ backend): the same objective, QUAIL's masked hinge included
    # (its boolean indexing splits the graph), activation checkpointing on, gives the eager run's losses.
    quail = ["quail.enabled=true", 'quail.tokens=[".", ","]', "quail.margin=1.0", "quail.protect_only=false",
             "quail.normalize=whitelisted"]
    for name, compiled in (("eager", False), ("compiled", True)):
        cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=3, eval_every=0, compile=compiled), quail)
        trainer = Trainer(cfg, tmp_path / name, progress=False)
        assert (trainer.fwd_model is not trainer.objective) == compiled
        trainer.run()
    eager, compiled = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("eager", "compiled"))
    assert sum(r["quail_positions"] for r in eager) > 0
    assert [r["quail_positions"] for r in compiled] == [r["quail_positions"] for r in eager]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-4)
    assert [r["quail_loss"] for r in compiled] == pytest.approx([r["quail_loss"] for r in eager], abs=1e-4)


def test_a_run_shorter_than_its_warmup_is_warned_about(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=4, eval_every=0))
    with pytest.warns(UserWarning, match=r"warmup_steps \(4\) >= train.max_steps \(2\): the run ends inside"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_a_resume_with_another_schedule_says_what_changed(tmp_path, tiny_mix):
    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=3, eval_every=0)), tmp_path / "run",
            progress=False).run()
    longer = load_config(write_config(tmp_path, tiny_mix, max_steps=6, eval_every=0))
    with pytest.warns(UserWarning, match=r"schedule differs from the checkpoint's \(max_steps 3 -> 6\); the lr "
                                         r"follows this run's from step 3"):
        Trainer(longer, tmp_path / "run", resume=True, progress=False)


def test_bits_per_byte_leaves_out_targets_without_bytes(tmp_path, tiny_mix):
    """<|endoftext|> decodes to no bytes, so its loss is in neither sum of bits per byte; val loss keeps it."""
    import torch.nn.functional as F

    trainer = Trainer(load_config(write_config(tmp_path, tiny_mix, eval_batches=40)), tmp_path / "run", progress=False)
    val_loss, val_bpb = trainer.evaluate()
    special = torch.tensor(sorted(trainer.tokenizer.special_ids.values()))
    loader = trainer._loader("val")
    nats = byte_nats = n_tok = n_bytes = n_special = 0.0
    with torch.no_grad():
        for _ in range(40):
            x, y = loader.next_batch()
            loss = F.cross_entropy(trainer.model(x).flatten(0, 1).double(), y.flatten(), reduction="none")
            has_bytes = ~torch.isin(y.flatten(), special)
            nats, n_tok = nats + float(loss.sum()), n_tok + loss.numel()
            byte_nats += float(loss[has_bytes].sum())
            n_bytes += sum(len(trainer.tokenizer.decode([t]).encode()) for t in y.flatten()[has_bytes].tolist())
            n_special += float((~has_bytes).sum())
    assert n_special > 0  # the val windows hold document ends
    assert val_loss == pytest.approx(nats / n_tok, rel=1e-5)
    # every byte of these windows' tokens is ASCII-whole, so decoding each token alone counts its bytes
    assert val_bpb == pytest.approx(byte_nats / (math.log(2) * n_bytes), rel=1e-5)


def test_resume_first_restores_a_checkpoint_a_kill_left_moved_aside(tmp_path, tiny_mix):
    """A kill while a step directory was being replaced leaves it moved aside: resuming takes it, not an older one."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=6, ckpt_every=3, eval_every=0))
    Trainer(cfg, tmp_path / "run", progress=False).run()
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000006"
    latest.rename(latest.parent / f".{latest.name}.abcd1234.old")  # between atomic_dir's two renames
    resumed = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    assert resumed.state.step == 6 and latest.is_dir()
