"""The run's logs: metrics.jsonl and the optional TensorBoard events agree after a resume; progress is a bar on a
terminal and plain lines elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from felix.metrics import MetricsLog, Progress, read_metrics


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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = re.compile(r"train step (\d+)/30 \| loss 2\.5000 \| lr 0\.0003 \| gnorm 0\.75 \| 1,234 tok/s \| "
                  r"mfu 41\.0% \| elapsed \d\d:\d\d, eta \d\d:\d\d")


def test_progress_off_a_terminal_is_one_plain_line_every_few_steps():
    """In a log file (nohup, the journal) tqdm's carriage-return redraws made one physical line of ~1000 updates."""
    log = io.StringIO()
    progress = Progress(30, initial=3, every=10, stream=log)  # a resumed run: steps 4..30
    for _ in range(27):
        progress.update(2.5, 1234.0, 0.41, 3e-4, 0.75)
    progress.write("step 20: val loss 2.4000, 1.1000 bits/byte")
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [int(LINE.fullmatch(x).group(1)) for x in lines[:3]] == [10, 20, 30]  # and the last step
    assert lines[3:] == ["step 20: val loss 2.4000, 1.1000 bits/byte"]


def test_progress_on_a_terminal_is_the_bar_and_off_is_silent():
    tty = _Terminal()
    progress = Progress(30, every=1, stream=tty)
    for _ in range(30):
        progress.update(2.5, 1234.0, None, 3e-4, 0.75)
    progress.close()
    assert "\r" in tty.getvalue() and "30/30" in tty.getvalue() and "train step" not in tty.getvalue()
    assert "gnorm=0.75" in tty.getvalue()
    for stream, kwargs in ((io.StringIO(), {"enabled": False}), (io.StringIO(), {"is_main": False})):
        quiet = Progress(30, stream=stream, **kwargs)
        quiet.update(2.5, 1234.0, None, 3e-4)
        quiet.close()
        assert stream.getvalue() == ""


def test_felix_train_logging_to_a_file_prints_a_line_every_log_every_steps(tmp_path, tiny_mix, capsys):
    from test_trainer import write_config

    from felix.cli import main

    cfg = write_config(tmp_path, tiny_mix, max_steps=5, log_every=2, eval_every=0, warmup_steps=1)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err  # not a terminal
    assert "\r" not in err
    steps = re.findall(r"^train step (\d)/5 \| loss \d+\.\d{4} \| lr \S+ \| gnorm [\d.e+-]+ \| [\d,]+ tok/s \| "
                       r"mfu [\d.]+% \| elapsed \d\d:\d\d, eta \d\d:\d\d$", err, re.MULTILINE)
    assert steps == ["2", "4", "5"], err
