"""`felix demo` end to end at a size a test can afford (the real demo is the same code, bigger)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from felix.cli import main
from felix.demo import VAL_TOKENS, fit_to_budget, prepare_data, run_demo
from felix.errors import FelixError
from felix.metrics import read_metrics

SMALL = ["--corpus-mb", "0.4", "--max-steps", "24", "--no-progress", "model.vocab_size=1024", "model.d_model=64",
         "model.n_heads=2", "model.d_ff=128", "model.n_layers=2", "train.seq_len=64", "train.micro_batch_size=4",
         "train.eval_every=12", "train.ckpt_every=12", "train.warmup_steps=4", "train.dtype=fp32"]


def test_demo_runs_every_stage_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--json", *SMALL]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("corpus/code.jsonl", "corpus/docs.jsonl", "tokenizer.json", "shards/code/index.json", "mix.yaml",
                 "run/metrics.jsonl", "report.md", "report.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["steps"] == 24 and report["tokens_seen"] == 24 * 4 * 64
    assert report["params"] > report["splice_params"] > 0
    assert report["tok_per_s"] > 0 and report["mfu"] > 0 and report["flops_per_token"] > 0
    assert report["final_loss"] < report["first_loss"] and report["val_bpb"] > 0
    assert len(report["samples"]) == 5 and all(isinstance(s["completion"], str) for s in report["samples"])
    for source in ("code", "docs", "tasks"):  # enough held-out text in every source, or a quarter of it
        index = json.loads((out / "shards" / source / "index.json").read_text())["splits"]
        docs = index["train"]["n_documents"] + index["val"]["n_documents"]
        assert index["val"]["n_tokens"] >= VAL_TOKENS or index["val"]["n_documents"] == docs // 4, source
    md = (out / "report.md").read_text()
    assert "tokens seen" in md and "![loss](loss.png)" in md and "Greedy samples" in md
    assert report["grad_norm"]["steps"] == 24 and report["grad_norm"]["clip"] == 1.0
    assert f"| gradient norm | median {report['grad_norm']['median']:.3g} before clipping; " in md
    wall = json.loads((out / "wall_time.json").read_text())
    assert report["wall_time"] == wall and wall["runs"] == 1
    assert wall["seconds"] == pytest.approx(report["stage_seconds"]["total"], abs=0.02)
    assert f"| wall time | {report['stage_seconds']['total']:.0f} s (corpus " in md

    # a second run finds every stage done and reports the same training, and what both runs cost; in words, with
    # the val loss to 4 decimals
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    again = json.loads((out / "report.json").read_text())
    assert capsys.readouterr().out.splitlines()[0].endswith(f", val loss {again['val_loss']:.4f}")
    assert again["tokens_seen"] == report["tokens_seen"] and again["final_loss"] == report["final_loss"]
    total = again["wall_time"]
    assert total == json.loads((out / "wall_time.json").read_text()) and total["runs"] == 2
    assert total["seconds"] == pytest.approx(wall["seconds"] + again["stage_seconds"]["total"], abs=0.02)
    md = (out / "report.md").read_text()
    assert (f"| wall time | {total['seconds']:.0f} s over 2 runs into this directory (interrupted ones included); "
            f"this run {again['stage_seconds']['total']:.0f} s (corpus ") in md



def test_a_demo_that_cannot_fit_its_budget_trains_fewer_steps_with_the_full_schedule(tmp_path, capsys):
    out = tmp_path / "demo"
    small = [a for a in SMALL if a not in ("--max-steps", "24")]  # the config's 600 steps
    # building the corpus alone outlasts 3 seconds: training is cut to its floor, twice the warmup
    assert main(["demo", "--out", str(out), "--json", "--budget-minutes", "0.05", *small]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["budget"]["config_steps"] == 600 and report["steps"] == report["budget"]["steps"] == 8
    rows = read_metrics(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["lr"] == 0.0  # decayed to the end
    assert "8 of the config's 600 steps fit 0.05 minutes" in (out / "report.md").read_text()
    # run again, the demo finds its shortened run finished instead of continuing it to 600, and still says why
    assert main(["demo", "--out", str(out), "--json", *small]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["steps"] == 8 and again["budget"] == report["budget"]
    assert "8 of the config's 600 steps fit 0.05 minutes" in (out / "report.md").read_text()
    # asked for the full length, it refuses to restart the decayed run's schedule rather than splice two
    assert main(["demo", "--out", str(out), "--budget-minutes", "0", *small]) == 2
    assert "trains 8 steps, this one asks for 600" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out / "run" / "metrics.jsonl")] == list(range(1, 9))


class _ProbeTrainer:
    """What `fit_to_budget` uses of a Trainer: a run that logs `dt` per step (every `log_every`th)."""

    def __init__(self, out_dir: Path, max_steps: int, warmup_steps: int, log_every: int = 1):
        self.out_dir, self.log_every = out_dir, log_every
        out_dir.mkdir()
        self.cfg = SimpleNamespace(train=SimpleNamespace(max_steps=max_steps, warmup_steps=warmup_steps,
                                                         decay_start_step=None))
        self.state = SimpleNamespace(step=0)
        self.set_to: int | None = None

    def run(self, until: int) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            for step in range(self.state.step + 1, until + 1):
                if step % self.log_every == 0:
                    f.write(json.dumps({"step": step, "loss": 5.0, "dt": 0.001}) + "\n")
        self.state.step = until

    def set_max_steps(self, steps: int) -> None:
        self.set_to = steps


def test_fit_to_budget_at_its_edges(tmp_path):
    now = time.perf_counter()
    # a huge (infinite) budget fits every step rather than failing to count them
    assert fit_to_budget(_ProbeTrainer(tmp_path / "a", 600, 30), math.inf) is None
    # a warmup over half the run: the floor of twice the warmup would lengthen the run, not shorten it
    t = _ProbeTrainer(tmp_path / "b", 600, 400)
    assert fit_to_budget(t, now) is None and t.set_to is None
    # a log_every past the probe logs none of its steps: the pace comes from its wall time instead
    t = _ProbeTrainer(tmp_path / "c", 600, 30, log_every=50)
    budget = fit_to_budget(t, now)
    assert budget is not None and t.set_to == budget["steps"] == 60


def test_a_demo_directory_refuses_data_asked_for_otherwise(tmp_path):
    prepare_data(tmp_path, 300, 30_000, 0, {})
    tokenizer = (tmp_path / "tokenizer.json").read_bytes()
    # another corpus size or vocabulary would rebuild the corpus under the old tokenizer and shards
    for vocab, corpus_bytes in ((300, 40_000), (400, 30_000)):
        with pytest.raises(FelixError, match="data.json"):
            prepare_data(tmp_path, vocab, corpus_bytes, 0, {})
    assert (tmp_path / "tokenizer.json").read_bytes() == tokenizer
    assert json.loads((tmp_path / "corpus" / "corpus.json").read_text())["params"]["max_bytes"] == 30_000
    prepare_data(tmp_path, 300, 30_000, 0, {})  # the same data: every stage reused


def test_interrupted_runs_count_in_the_wall_time(tmp_path, monkeypatch):
    import felix.demo as demo

    monkeypatch.setattr(demo, "WALL_TIME_EVERY", 0.05)
    out, record = tmp_path / "demo", tmp_path / "demo" / "wall_time.json"
    seen: list[dict] = []

    def interrupted_training(*args, **kwargs):
        """Ctrl-C in the train stage, once the running total was saved mid-stage (all a killed run leaves)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = json.loads(record.read_text()) if record.is_file() else {"runs": 0}
            if found["runs"] == len(seen) + 1:
                seen.append(found)
                raise KeyboardInterrupt
            time.sleep(0.01)
        raise AssertionError("no running total saved during the train stage")

    monkeypatch.setattr(demo, "Trainer", interrupted_training)
    argv = ["demo", "--out", str(out), "--corpus-mb", "0.03", "--no-progress", "model.vocab_size=300"]
    assert main(argv) == 130
    first = json.loads(record.read_text())
    assert first["runs"] == 1 and first["seconds"] >= seen[0]["seconds"] > 0
    assert main(argv) == 130  # resumed and interrupted again: both runs' seconds
    second = json.loads(record.read_text())
    assert second["runs"] == 2 and second["seconds"] >= seen[1]["seconds"] > first["seconds"]


@pytest.mark.parametrize("text", ["{cut off", '{"runs": 0, "seconds": 5}', '{"runs": 2, "seconds": NaN}', "[3]"])
def test_an_unreadable_wall_time_record_is_named_before_any_work(tmp_path, text):
    (tmp_path / "wall_time.json").write_text(text, encoding="utf-8")
    with pytest.raises(FelixError, match=r"wall_time.json: .*delete it to count the wall time from this run"):
        # SMALL's model and steps: without the check this would be a quick whole demo, not an 8-minute one
        run_demo(tmp_path, overrides=[*(a for a in SMALL if "=" in a), "train.max_steps=24"], corpus_bytes=30_000,
                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wall_time.json"]
    assert (tmp_path / "wall_time.json").read_text(encoding="utf-8") == text


def test_an_unreadable_data_record_is_named_before_any_work(tmp_path):
    (tmp_path / "data.json").write_text("{cut off", encoding="utf-8")
    with pytest.raises(FelixError, match=r"data.json: unreadable"):
        prepare_data(tmp_path, 512, 100_000, 0, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
