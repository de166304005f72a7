"""One process per run directory: a second `felix train` or `felix demo` into a directory in use is refused before
it touches anything there (the first's checkpoint write in flight, its metrics.jsonl), naming the holder's pid; a
SIGKILLed holder leaves no stale lock; a trainer holds it until closed. The other process here takes the lock the
way the trainer does, without importing torch (a fraction of a second)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_trainer import write_config

from felix.checkpoint import list_checkpoints
from felix.cli import main
from felix.config import load_config
from felix.demo import run_demo
from felix.errors import FelixError
from felix.trainer import Trainer

HOLD = ("import sys, time; from pathlib import Path; from felix.run_lock import lock_run_dir; "
        "lock = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)")

TAKE = "import sys; from pathlib import Path; from felix.run_lock import lock_run_dir; lock_run_dir(Path(sys.argv[1]))"


@contextmanager
def held_elsewhere(directory: Path) -> Iterator[subprocess.Popen]:
    """Another process holding `directory`'s run lock until the block ends (or the test kills it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def in_use(directory: Path, pid: int) -> str:
    return rf"{re.escape(str(directory))}: another felix run is using this directory \(pid {pid} on "


def test_a_second_run_into_a_directory_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, tiny_mix,
                                                                                             capsys):
    cfg_path = write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=1, eval_every=0, ckpt_every=2)
    run = tmp_path / "run"
    # what the first run has in flight: a checkpoint being written, its log
    writing = run / "checkpoints" / ".step-00000002.host-1.abcd1234.tmp"
    writing.mkdir(parents=True)
    (writing / "model.safetensors").write_bytes(b"half")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    with held_elsewhere(run) as holder:
        with pytest.raises(FelixError, match=in_use(run, holder.pid)):
            Trainer(load_config(cfg_path), run, resume=True, progress=False)
        capsys.readouterr()
        assert main(["train", "--config", str(cfg_path), "--out", str(run), "--resume", "--no-progress"]) == 2
        assert f"(pid {holder.pid} on " in capsys.readouterr().err
        assert (writing / "model.safetensors").read_bytes() == b"half"
        assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 6.0}\n'
        assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "metrics.jsonl"]
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel let go of a killed holder's lock: the next run proceeds (and clears the dead write)
    trainer = Trainer(load_config(cfg_path), run, progress=False)
    trainer.run()
    assert not writing.exists() and [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    # and holds the lock until it is closed: another process is refused, told this one's pid
    take = [sys.executable, "-c", TAKE, str(run)]
    refused = subprocess.run(take, capture_output=True, text=True)
    assert refused.returncode == 1 and f"(pid {os.getpid()} on {socket.gethostname()}, per " in refused.stderr
    trainer.close()
    assert subprocess.run(take, capture_output=True, text=True).returncode == 0


def test_a_second_demo_into_a_directory_in_use_is_refused_before_any_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    tiny = ["model.vocab_size=300", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=2",
            "train.seq_len=32", "train.micro_batch_size=2", "train.max_steps=2", "train.eval_every=0"]
    with held_elsewhere(out) as holder:
        with pytest.raises(FelixError, match=in_use(out, holder.pid)):
            run_demo(out, overrides=tiny, corpus_bytes=30_000, progress=False, budget_minutes=None)
        capsys.readouterr()
        assert main(["demo", "--out", str(out), "--corpus-mb", "0.03", "--no-progress", *tiny]) == 2
        assert f"(pid {holder.pid} on " in capsys.readouterr().err
    # no stage ran, and no run into the directory is counted in wall_time.json
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
