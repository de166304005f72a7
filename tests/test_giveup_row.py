"""A run that gives up on bad steps (no checkpoint to roll back to, or too many rollbacks) still logs the row of
the step that stopped it, with its `skipped` reason, whatever log_every is; no step is logged twice. Every skipped
step is logged, whatever log_every is."""

from __future__ import annotations

import pytest
import torch
from test_trainer import write_config

from felix.config import load_config
from felix.errors import FelixError
from felix.metrics import read_metrics
from felix.trainer import Trainer


def _poison(trainer: Trainer) -> torch.utils.hooks.RemovableHandle:
    """A fault no checkpoint cures: every forward from now on is NaN (until the handle is removed)."""
    return trainer.model.tok_emb.register_forward_hook(lambda mod, inp, out: out * float("nan"))


def test_giving_up_without_a_checkpoint_logs_the_stopping_step(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=8, ckpt_every=8, max_bad_steps=2, log_every=5,
                                   eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    _poison(trainer)
    with pytest.raises(FelixError, match="no checkpoint to roll back to"):
        trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # both skipped: logged between log_every rows; step 2 stopped it
    assert all("non-finite" in r["skipped"] for r in rows)


def test_giving_up_after_rollbacks_logs_the_stopping_step_once(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=12, ckpt_every=2, max_bad_steps=2,
                                   max_rollbacks=2, warmup_steps=1, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(until=4)
    poison = _poison(trainer)
    with pytest.raises(FelixError, match=r"step 10: training keeps failing after 2 rollback\(s\)"):
        trainer.run()
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 11))  # rollbacks do not rewind the step: 5..10 once each, 10 the last
    skipped = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "skipped" in r]
    assert skipped == [5, 6, 7, 8, 9, 10]
    # resuming in-process after the give-up continues the log without repeating step 10
    poison.remove()
    trainer.run(until=11)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 12))


def test_a_skipped_step_is_logged_between_log_every_rows(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=10, ckpt_every=10, max_bad_steps=3, log_every=5,
                                   eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run(until=2)
    poison = _poison(trainer)
    trainer.run(until=3)
    poison.remove()
    trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], "skipped" in r) for r in rows] == [(3, True), (5, False), (10, False)]
