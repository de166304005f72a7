"""The run's logs: metrics.jsonl and the optional TensorBoard events agree after a resume."""

from __future__ import annotations

import pytest

from felix.metrics import MetricsLog, read_metrics


def _scalars(tb_dir) -> list[tuple[int, float]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def test_a_resumed_run_replaces_the_recomputed_steps_in_both_logs(tmp_path):
    """The JSONL dropped the rows past the checkpoint, TensorBoard kept them: it drew steps 4 and 5 twice."""
    pytest.importorskip("torch.utils.tensorboard")
    first = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", resume_step=3, tensorboard_dir=tmp_path / "tb")
    for step in (4, 5):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == want
    assert _scalars(tmp_path / "tb") == want


def test_damaged_lines_are_dropped_and_a_resume_keeps_the_rest(tmp_path):
    """Bytes that are not UTF-8 and JSON that is not an object (disk damage) stopped a resume with a traceback."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe garbage\n[1, 2]\n7\n{"step": 2, "loss": 1.5}\n{"step": 3')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    MetricsLog(path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_a_resume_in_the_same_second_past_the_ninth_writer_still_purges(tmp_path, monkeypatch):
    """Event files are named by second, then a per-process counter without padding: a resumed writer opened in the
    first one's second as writer 10 sorted before writer 9, TensorBoard read it first and drew both runs' steps."""
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer._global_uid, "_value", 9)  # as after nine writers in this process
    first = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    first.log({"step": 1, "loss": 1.0})
    first.log({"step": 2, "loss": 2.0})
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", resume_step=1, tensorboard_dir=tmp_path / "tb")
    resumed.log({"step": 2, "loss": 20.0})
    resumed.close()
    assert _scalars(tmp_path / "tb") == [(1, 1.0), (2, 20.0)]
