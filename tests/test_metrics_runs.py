"""metrics.jsonl describes one run: a run that does not resume its --out keeps an earlier attempt's log aside
instead of mixing its rows in (--init-from) or deleting them (a fresh run, --init-weights-only)."""

from __future__ import annotations

import pytest
from test_metrics import _scalars
from test_trainer import write_config

from felix.checkpoint import checkpoint_dir, list_checkpoints
from felix.config import load_config
from felix.errors import FelixError
from felix.metrics import read_metrics
from felix.trainer import Trainer


def _steps(path) -> list[int]:
    return [r["step"] for r in read_metrics(path)]


def _killed_attempt(cfg, out) -> None:
    """A run stopped before its first checkpoint: rows in metrics.jsonl, nothing to --resume."""
    Trainer(cfg, out, progress=False).run(until=2)
    assert _steps(out / "metrics.jsonl") == [1, 2] and not list_checkpoints(out)


def test_init_from_into_a_directory_with_a_killed_attempt_logs_only_its_own_steps(tmp_path, tiny_mix):
    """The log kept the earlier attempt's rows up to the checkpoint's step: steps 1, 2 then 5..8. (A run from a
    checkpoint with nothing left to train, whose summary reported the earlier attempt's losses as its own, is
    refused before it touches the log.)"""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=8, ckpt_every=4, eval_every=2))
    Trainer(cfg, tmp_path / "a", progress=False).run()
    run = tmp_path / "b"
    _killed_attempt(cfg, run)
    with pytest.raises(FelixError, match=r"step-00000008: the checkpoint is at step 8, and train.max_steps is 8"):
        Trainer(cfg, run, init_from=checkpoint_dir(tmp_path / "a") / "step-00000008", progress=False)
    assert _steps(run / "metrics.jsonl") == [1, 2]
    # from step 4, continued in-process: this run's rows alone, in the JSONL and in TensorBoard
    with pytest.warns(UserWarning, match=r"b/metrics.jsonl.*earlier attempt.*metrics\.earlier-1\.jsonl"):
        trainer = Trainer(cfg, run, init_from=checkpoint_dir(tmp_path / "a") / "step-00000004", progress=False)
        trainer.run(until=6)
    result = trainer.run()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 6, 7, 8] and result.val_loss == rows[-1]["val_loss"]
    assert _steps(run / "metrics.earlier-1.jsonl") == [1, 2] and not (run / "metrics.earlier-2.jsonl").exists()
    assert [step for step, _ in _scalars(run / "tb")] == [5, 6, 7, 8]


def test_a_fresh_start_keeps_each_earlier_attempts_log_aside(tmp_path, tiny_mix):
    """A fresh run (or --init-weights-only) deleted the metrics.jsonl it found without a word."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=8, ckpt_every=4, eval_every=0))
    Trainer(cfg, tmp_path / "a", progress=False).run(until=4)
    run = tmp_path / "b"
    _killed_attempt(cfg, run)
    with pytest.warns(UserWarning, match="metrics.earlier-1.jsonl"):
        Trainer(cfg, run, init_from=tmp_path / "a", init_weights_only=True, progress=False).run(until=3)
    with pytest.warns(UserWarning, match="metrics.earlier-2.jsonl"):
        Trainer(cfg, run, progress=False).run(until=1)
    assert _steps(run / "metrics.jsonl") == [1]
    assert _steps(run / "metrics.earlier-1.jsonl") == [1, 2]
    assert _steps(run / "metrics.earlier-2.jsonl") == [1, 2, 3]
