"""train.ckpt_every_minutes: a wall-clock checkpoint trigger beside the step count (a budgeted run on a slow machine
trains fewer steps than ckpt_every and kept no checkpoint before its end); and an earlier attempt's TensorBoard
events are moved aside with its metrics.jsonl."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_metrics import _scalars
from test_trainer import losses, write_config

from felix.checkpoint import list_checkpoints
from felix.config import config_from_dict, load_config
from felix.distributed import DistInfo
from felix.errors import FelixError
from felix.metrics import MetricsLog, read_metrics
from felix.train_control import StepControl
from felix.trainer import Trainer

EVERY_STEP = 1e-6  # minutes: every step qualifies


def _steps(run_dir) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(run_dir)]


def test_the_wall_clock_interval_checkpoints_mid_run_and_keep_last_applies(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=5, ckpt_every=1000, eval_every=0, keep_last=3,
                                   ckpt_every_minutes=EVERY_STEP))
    Trainer(cfg, tmp_path / "timed", progress=False).run()
    assert _steps(tmp_path / "timed") == [3, 4, 5]  # one per step, pruned to the newest keep_last
    plain = load_config(write_config(tmp_path, tiny_mix, max_steps=5, ckpt_every=1000, eval_every=0, keep_last=3))
    Trainer(plain, tmp_path / "plain", progress=False).run()
    assert _steps(tmp_path / "plain") == [5]  # the final one alone
    # a long interval is not yet due: the step count and the end decide, as before
    hour = load_config(write_config(tmp_path, tiny_mix, max_steps=5, ckpt_every=2, eval_every=0, keep_last=5,
                                    ckpt_every_minutes=60.0))
    Trainer(hour, tmp_path / "hour", progress=False).run()
    assert _steps(tmp_path / "hour") == [2, 4, 5]


def test_timed_checkpoints_leave_training_and_resume_exact(tmp_path, tiny_mix):
    """A checkpoint write touches neither the RNG nor the data position: a run saving at every step and one resumed
    from a timed checkpoint train exactly what one without them does."""
    plain = load_config(write_config(tmp_path, tiny_mix, max_steps=6, ckpt_every=1000, eval_every=0))
    Trainer(plain, tmp_path / "plain", progress=False).run()
    timed = load_config(write_config(tmp_path, tiny_mix, max_steps=6, ckpt_every=1000, eval_every=0, keep_last=10,
                                     ckpt_every_minutes=EVERY_STEP))
    Trainer(timed, tmp_path / "timed", progress=False).run(until=3)
    assert _steps(tmp_path / "timed") == [1, 2, 3]
    Trainer(timed, tmp_path / "timed", resume=True, progress=False).run()
    assert losses(tmp_path / "timed") == losses(tmp_path / "plain")
    assert len(losses(tmp_path / "plain")) == 6


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_a_nonsense_interval_is_refused_naming_the_field(value):
    raw = {"model": {"vocab_size": 64, "n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "max_seq_len": 16},
           "train": {"seq_len": 16, "ckpt_every_minutes": value}}
    with pytest.raises(FelixError, match="run.yaml: train: .*ckpt_every_minutes must be positive and finite"):
        config_from_dict(raw, "run.yaml")


def _agree(rank: int, root: Path) -> None:
    """One rank of a two-process gloo group whose clocks disagree: first rank 0, then rank 1 has waited two
    minutes of a one-minute interval."""
    dist.init_process_group("gloo", init_method=f"file://{root / 'init'}", rank=rank, world_size=2)
    try:
        answers = []
        for late_rank in (0, 1):
            control = StepControl(1.0, DistInfo(rank, 2, rank), torch.device("cpu"))
            if rank == late_rank:
                control.since -= 120.0
            answers.append(control.decide()[1])
        (root / f"due-{rank}").write_text(str(answers))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes that import torch: seconds each on a loaded machine
def test_rank_zeros_clock_decides_for_every_rank(tmp_path):
    """Ranks checkpointing by their own clocks could disagree at a step: one would wait in the save's barrier for
    ever. Every rank takes rank 0's decision."""
    mp.start_processes(_agree, args=(tmp_path,), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"due-{rank}").read_text() for rank in (0, 1)] == [str([True, False])] * 2


def test_an_earlier_attempts_tensorboard_events_move_aside_with_its_rows(tmp_path):
    """The fresh run's purge hid the earlier attempt's events, which stayed in tb/ beside the new ones: a reader that
    skips the purge drew both runs, and TensorBoard could no longer show the earlier attempt."""
    pytest.importorskip("torch.utils.tensorboard")
    (tmp_path / "tb.earlier-1").mkdir()  # left by someone: its N is taken for both names
    for attempt in (1, 2):
        log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
        for step in range(1, 4):
            log.log({"step": step, "loss": float(10 * attempt + step)})
        log.close()
    with pytest.warns(UserWarning, match=r"metrics\.earlier-3\.jsonl \(its TensorBoard events to tb\.earlier-3\)"):
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb").close()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.earlier-2.jsonl")] == [11.0, 12.0, 13.0]
    assert _scalars(tmp_path / "tb.earlier-2") == [(1, 11.0), (2, 12.0), (3, 13.0)]
    assert _scalars(tmp_path / "tb.earlier-3") == [(1, 21.0), (2, 22.0), (3, 23.0)]
    assert list((tmp_path / "tb.earlier-1").iterdir()) == []
    # the new tb/ holds this run's events alone; a resume keeps tb/ where it is
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MetricsLog(tmp_path / "metrics.jsonl", resume_step=0, tensorboard_dir=tmp_path / "tb").close()
    assert not [w for w in caught if "earlier" in str(w.message)]
    assert sorted(p.name for p in tmp_path.glob("tb*")) == ["tb", "tb.earlier-1", "tb.earlier-2", "tb.earlier-3"]
