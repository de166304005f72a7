"""A graceful stop of training: the first SIGINT or SIGTERM ends the run after the current step with a checkpoint
(`felix train` exits 130 / 143 and `--resume` continues exactly), a second SIGINT interrupts at once while a
repeated SIGTERM changes nothing, and under torchrun every rank stops at the same step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_trainer import _wait_for_step, felix_cmd, losses, write_config

from felix.checkpoint import latest_checkpoint, list_checkpoints
from felix.config import load_config
from felix.metrics import read_metrics
from felix.trainer import Trainer

# `felix train --json`'s keys before the stop existed: an interrupted run prints them all too
SUMMARY_KEYS = {"out_dir", "steps", "tokens", "final_loss", "val_loss", "val_bpb", "tok_per_s", "mfu", "params",
                "seconds", "skipped_steps", "flops_per_token", "peak_flops", "world_size"}


def _refuse(signum, frame):
    """The caller's own handler: the trainer must replace it while it runs and put it back after."""
    raise AssertionError(f"the trainer left {signal.Signals(signum).name} to the caller's handler")


def _stopped_step(err: str, sig: str) -> int:
    found = re.search(rf"stopped by {sig} after step (\d+)", err)
    assert found, err[-3000:]
    return int(found.group(1))


def _read_until(proc: subprocess.Popen, text: str) -> str:
    """What `proc` writes to stderr up to the line holding `text`."""
    lines = []
    while not lines or text not in lines[-1]:
        lines.append(proc.stderr.readline())
        assert lines[-1], f"stderr ended before {text!r}: {''.join(lines)[-3000:]}"
    return "".join(lines)


@pytest.mark.parametrize("sig, code, json_out", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path, tiny_mix, sig, code,
                                                                             json_out):
    cfg_path = write_config(tmp_path, tiny_mix, max_steps=24, ckpt_every=1000, eval_every=8, keep_last=2)
    cfg = load_config(cfg_path)
    run = tmp_path / "stopped"
    argv = felix_cmd("train", "--config", str(cfg_path), "--out", str(run), "--no-progress",
                     *(["--json"] if json_out else []))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run / "metrics.jsonl", 2, proc)
    os.kill(proc.pid, sig)
    before = ""
    if sig == signal.SIGTERM:  # sent again while the stop is under way, as systemd's control-group stop does
        before = _read_until(proc, "stopping after this step")
        os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    err = before + err
    assert proc.returncode == code, err[-3000:]
    step = _stopped_step(err, sig.name)
    assert 2 <= step < 24, "the run ended before the signal: nothing was tested"
    assert "stopping after this step; press Ctrl-C again to stop at once" in err
    assert f"saved {run / 'checkpoints' / f'step-{step:08d}'}; `felix train --out {run} --resume` continues it" in err
    assert latest_checkpoint(run).name == f"step-{step:08d}"
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == step  # the step's row was logged before the stop
    if json_out:
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary.keys() >= SUMMARY_KEYS and summary["interrupted"] == "SIGTERM" and summary["steps"] == step
    else:
        assert f"trained {step} steps" in out
        return  # what was saved does not depend on the signal: resuming it once is enough
    # resumed, the run logs exactly the losses of one never stopped
    Trainer(cfg, tmp_path / "ref", progress=False).run()
    Trainer(cfg, run, resume=True, progress=False).run()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 25))
    assert losses(run) == losses(tmp_path / "ref")



def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_sigint_ignored_when_the_run_started_stays_ignored_and_sigterm_still_stops_it(tmp_path, tiny_mix):
    """A script's `felix train ... &` starts with SIGINT ignored. Before, a SIGINT in the run's first seconds did
    nothing and one after the trainer took the signal over stopped it; now it stays ignored, as Python leaves it."""
    cfg_path = write_config(tmp_path, tiny_mix, max_steps=400, ckpt_every=1000, eval_every=0)
    run = tmp_path / "run"
    proc = subprocess.Popen(felix_cmd("train", "--config", str(cfg_path), "--out", str(run), "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint)
    _wait_for_step(run / "metrics.jsonl", 2, proc)
    os.kill(proc.pid, signal.SIGINT)
    ignored_until = len(read_metrics(run / "metrics.jsonl")) + 3
    _wait_for_step(run / "metrics.jsonl", ignored_until, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGINT" not in err and _stopped_step(err, "SIGTERM") >= ignored_until

def _in_process(tmp_path, tiny_mix, **train) -> Trainer:
    cfg = load_config(write_config(tmp_path, tiny_mix, eval_every=0, warmup_steps=1, **train))
    return Trainer(cfg, tmp_path / "run", progress=False)


def test_a_stop_on_a_bad_step_keeps_the_last_good_checkpoint_and_says_so(tmp_path, tiny_mix, capfd):
    from felix.train_control import stop_message

    trainer = _in_process(tmp_path, tiny_mix, max_steps=10, ckpt_every=3)
    trainer.run(until=3)
    with torch.no_grad():  # the next step is bad: its weights are the damage a checkpoint would keep
        trainer.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    sent = []
    trainer.model.tok_emb.register_forward_hook(
        lambda *_: None if sent else sent.append(signal.raise_signal(signal.SIGTERM)))
    previous = signal.signal(signal.SIGTERM, _refuse)
    try:
        result = trainer.run()
        assert signal.getsignal(signal.SIGTERM) is _refuse
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted == signal.SIGTERM and result.steps == 4 and trainer.state.skipped_steps == 1
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    message = stop_message(result, "--resume continues it")
    assert message == (f"stopped by SIGTERM after step 4, a bad step whose weights are not checkpointed; --resume "
                       f"continues it from the last good checkpoint, {tmp_path / 'run' / 'checkpoints'}/step-00000003")
    assert "SIGTERM: stopping after this step" in capfd.readouterr().err
    # a trainer stopped on a signal stays stopped: the caller asked the process to stop
    assert trainer.run().interrupted == signal.SIGTERM and trainer.state.step == 4


def test_a_second_sigint_while_stopping_interrupts_at_once(tmp_path, tiny_mix, capfd):
    trainer = _in_process(tmp_path, tiny_mix, max_steps=10, ckpt_every=1000)

    def twice(*_):  # Ctrl-C, then Ctrl-C again before the step is over
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    trainer.model.tok_emb.register_forward_hook(twice)
    previous = signal.signal(signal.SIGINT, _refuse)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
        assert signal.getsignal(signal.SIGINT) is _refuse  # put back on the way out of an error too
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "SIGINT: stopping after this step" in capfd.readouterr().err
    assert trainer.state.step == 0 and latest_checkpoint(tmp_path / "run") is None


def test_a_repeated_sigterm_still_stops_after_the_step_with_a_checkpoint(tmp_path, tiny_mix, capfd):
    """Before, the second SIGTERM (systemd's control-group stop and torchrun's forwarded copy) exited at once."""
    trainer = _in_process(tmp_path, tiny_mix, max_steps=10, ckpt_every=1000)

    def twice(*_):
        if trainer.state.step == 0:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    trainer.model.tok_emb.register_forward_hook(twice)
    result = trainer.run()
    assert result.interrupted == signal.SIGTERM and result.steps == 1
    assert latest_checkpoint(tmp_path / "run").name == "step-00000001"
    assert capfd.readouterr().err.count("SIGTERM: stopping after this step") == 1


def _worker_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker `rank` (a child of the agent `parent`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
                env = (proc / "environ").read_bytes().split(b"\0") if ppid == parent else []
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker of rank {rank} under {parent}")


@pytest.mark.slow  # three processes that import torch
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_mix):
    """Rank 1 alone gets SIGTERM: were it to stop by itself, rank 0 would wait in the next step's all_reduce (or
    the checkpoint's barrier) for ever. Every rank stops at one step, and rank 0 saves it. On the way, a timed
    checkpoint at every step (rank 0's clock, in the same all_reduce) is taken by both ranks at the same steps."""
    cfg = write_config(tmp_path, tiny_mix, max_steps=200, micro_batch_size=2, ckpt_every=1000, eval_every=0,
                       ckpt_every_minutes=1e-6, keep_last=1000)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *felix_cmd("train", "--config", str(cfg), "--out", str(run), "--no-progress", "--json")[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        rank1 = _worker_pid(proc.pid, 1)
        _wait_for_step(run / "metrics.jsonl", 2, proc)
        os.kill(rank1, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    step = _stopped_step(err, "SIGTERM")
    assert 2 <= step < 200 and "rank 1: SIGTERM: stopping after this step" in err
    summary = json.loads(out.strip().splitlines()[-1])  # rank 0 reported before either rank exited
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] == step and summary["world_size"] == 2
    assert [p.name for p in list_checkpoints(run)] == [f"step-{s:08d}" for s in range(1, step + 1)]
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == step


@pytest.mark.slow  # three processes that import torch
def test_under_torchrun_a_sigterm_to_every_process_stops_every_rank_with_a_checkpoint(tmp_path, tiny_mix):
    """systemd's stop (KillMode=control-group) and `scancel` signal torchrun and every rank at once, and torchrun
    forwards its own SIGTERM to each rank: each gets two. Before, rank 0 exited at its second without a checkpoint
    and rank 1 lost its peer (gloo: "Connection closed by peer")."""
    cfg = write_config(tmp_path, tiny_mix, max_steps=200, micro_batch_size=2, ckpt_every=1000, eval_every=0)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *felix_cmd("train", "--config", str(cfg), "--out", str(run), "--no-progress", "--json")[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        ranks = [_worker_pid(proc.pid, rank) for rank in (0, 1)]
        _wait_for_step(run / "metrics.jsonl", 2, proc)
        for pid in (*ranks, proc.pid):
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    step = _stopped_step(err, "SIGTERM")
    assert 2 <= step < 200 and "Connection closed" not in err, err[-3000:]
    assert f"`felix train --out {run} --resume` under torchrun (2 ranks, as this run) continues it" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] == step and summary["world_size"] == 2
    assert latest_checkpoint(run).name == f"step-{step:08d}"
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == step


class _ProbeTrainer:
    """What `fit_to_budget` uses of a Trainer, resumed at `step`; `stop_at` ends its run early as a signal does."""

    def __init__(self, out_dir: Path, step: int = 0, stop_at: int | None = None):
        self.out_dir, self.stop_at = out_dir, stop_at
        out_dir.mkdir()
        self.cfg = SimpleNamespace(train=SimpleNamespace(max_steps=600, warmup_steps=30, decay_start_step=None))
        self.state = SimpleNamespace(step=step)
        self.set_to: int | None = None

    def run(self, until: int) -> None:
        until = min(until, self.stop_at or until)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            for step in range(self.state.step + 1, until + 1):
                f.write(json.dumps({"step": step, "loss": 5.0, "dt": 0.5 if step <= self.state.step + 1 else 1.0})
                        + "\n")
        self.state.step = until

    def set_max_steps(self, steps: int) -> None:
        self.set_to = steps


def test_the_demos_time_budget_survives_a_stop_inside_its_probe(tmp_path):
    """A stop inside the budget's probe left a checkpoint: the demo run again resumes there and must still fit the
    run to its budget (it took a resumed demo for one past the probe, and trained all the configured steps)."""
    from felix.demo import fit_to_budget

    stopped = _ProbeTrainer(tmp_path / "a", stop_at=4)
    assert fit_to_budget(stopped, time.perf_counter()) is None and stopped.set_to is None  # no pace from a cut probe
    resumed = _ProbeTrainer(tmp_path / "b", step=4)
    budget = fit_to_budget(resumed, time.perf_counter() + 100)
    # the resumed probe's steps past its first (which pays the start-up) give the pace: 1 s a step
    assert budget is not None and budget["seconds_per_step"] == 1.0 and resumed.set_to == budget["steps"]
    assert fit_to_budget(_ProbeTrainer(tmp_path / "c", step=12), time.perf_counter()) is None  # past the probe


@pytest.mark.slow  # a whole (small) demo, twice
def test_a_stopped_demo_names_its_checkpoint_and_continues_when_run_again(tmp_path):
    from test_demo import SMALL

    from felix.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--json", "--out", str(out), *SMALL]
    proc = subprocess.Popen(felix_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out / "run" / "metrics.jsonl", 2, proc, timeout=300)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    step = _stopped_step(err, "SIGINT")
    assert step < 24 and f"saved {out / 'run' / 'checkpoints' / f'step-{step:08d}'}" in err
    assert f"felix demo --out {out}" in err and not (out / "report.json").exists()
    assert main(argv) == 0
    assert [r["step"] for r in read_metrics(out / "run" / "metrics.jsonl")] == list(range(1, 25))
    assert json.loads((out / "report.json").read_text())["steps"] == 24
