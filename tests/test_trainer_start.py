"""How a run starts and what it carries: fp16 loss scaling (scale saved, overflows skipped, not rolled
back), starting from another run's weights alone, and what is refused or warned about before step 1 (a val split
too short to evaluate, an --init-from with nothing left to train)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from test_trainer import TINY, losses, write_config

from felix.checkpoint import latest_checkpoint, load_checkpoint
from felix.config import load_config
from felix.datamix import DataMix
from felix.errors import FelixError
from felix.metrics import read_metrics
from felix.objective import calibrate_margin
from felix.trainer import Trainer


def test_fp16_training_scales_the_loss_and_resumes_exactly(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, dtype="fp16", eval_every=0))
    ref = Trainer(cfg, tmp_path / "ref", progress=False)
    assert ref.dtype == torch.float16
    ref.run()
    rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert all(r["loss_scale"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert ref.state.rollbacks == 0 and ref.state.bad_steps == 0
    applied = [r for r in rows if "skipped" not in r]
    assert len(applied) >= 8 and applied[-1]["loss"] < rows[0]["loss"] - 0.3
    # the scale and growth tracker travel in the checkpoint, so a resumed run scales exactly as this one
    saved = json.loads((latest_checkpoint(tmp_path / "ref") / "trainer.json").read_text())["trainer"]
    assert saved["grad_scaler"]["scale"] == ref.scaler.get_scale()

    half = Trainer(cfg, tmp_path / "resumed", progress=False)
    half.run(until=6)
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.scaler.get_scale() == half.scaler.get_scale()
    resumed.run()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "ref")
    assert [r["loss_scale"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == \
        [r["loss_scale"] for r in rows]


def test_fp16_overflows_lower_the_scale_without_a_rollback(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, dtype="fp16", max_steps=40, max_bad_steps=2,
                                   ckpt_every=100, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    # a scale far too large for fp16: the first gradients overflow until it has halved enough
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("overflowed" in r["skipped"] for r in rows if "skipped" in r)
    first = next(i for i, r in enumerate(rows) if "skipped" not in r)  # the scale halved until it fit
    assert first > cfg.train.max_bad_steps  # more skips in a row than bad steps may have before a rollback
    assert [r["loss_scale"] for r in rows[:first]] == [2.0 ** (39 - i) for i in range(first)]
    assert trainer.state.rollbacks == 0 and trainer.state.bad_steps == 0
    assert rows[-1]["loss"] < rows[first]["loss"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_init_weights_only_starts_a_fresh_run_from_the_weights(tmp_path, tiny_mix):
    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=20, eval_every=0)), tmp_path / "a",
            progress=False).run()
    source = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    # another seq_len (and max_seq_len): the data position cannot carry over, the weights can
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=4, seq_len=64, eval_every=0),
                      ["model.max_seq_len=128"])
    with pytest.raises(FelixError, match="--init-weights-only"):
        Trainer(cfg, tmp_path / "b", init_from=tmp_path / "a", progress=False)
    with pytest.warns(UserWarning, match=r"model config differs \(max_seq_len 64 -> 128\)"):
        trainer = Trainer(cfg, tmp_path / "b", init_from=tmp_path / "a", init_weights_only=True, progress=False)
    assert all(torch.equal(v, source.model_state[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.state.step == 0 and not trainer.optimizer.state
    trainer.run()
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["tokens"] == 4 * 64
    assert rows[0]["lr"] < rows[1]["lr"]  # a warmup of its own
    # it starts from what run a learned, far below a fresh model's ln(vocab)
    assert rows[0]["loss"] < math.log(TINY["model"]["vocab_size"]) - 0.5


def test_init_weights_only_refuses_other_shapes_naming_the_checkpoint(tmp_path, tiny_mix, capsys):
    from felix.cli import main

    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0)), tmp_path / "a",
            progress=False).run()
    cfg = load_config(write_config(tmp_path, tiny_mix, eval_every=0), ["model.d_ff=96"])
    with pytest.raises(FelixError, match=r"a/checkpoints/step-00000002: weights do not match .*shape mismatch"):
        Trainer(cfg, tmp_path / "b", init_from=tmp_path / "a", init_weights_only=True, progress=False)
    assert main(["train", "--config", str(write_config(tmp_path, tiny_mix)), "--out", str(tmp_path / "c"),
                 "--init-weights-only"]) == 2
    assert "--init-weights-only needs --init-from" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_run_shortened_during_its_warmup_is_the_run_configured_that_long(tmp_path, tiny_mix):
    ref = Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=8, warmup_steps=4, eval_every=0)),
                  tmp_path / "ref", progress=False)
    ref.run()
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=30, warmup_steps=4, eval_every=0))
    short = Trainer(cfg, tmp_path / "short", progress=False)
    short.run(until=3)
    short.set_max_steps(8)
    short.run()
    assert losses(tmp_path / "short") == losses(tmp_path / "ref")
    assert [r["lr"] for r in read_metrics(tmp_path / "short" / "metrics.jsonl")] == \
        [r["lr"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert load_config(tmp_path / "short" / "config.yaml").train.max_steps == 8
    assert load_checkpoint(latest_checkpoint(tmp_path / "short")).config.train.max_steps == 8
    with pytest.raises(FelixError, match="only during the warmup"):
        short.set_max_steps(20)


def test_a_checkpoint_past_step_0_without_a_data_position_is_refused(tmp_path, tiny_mix):
    """An empty loader state means "the start"; at step N it would silently train on the first data again."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=4, ckpt_every=2, eval_every=0))
    Trainer(cfg, tmp_path / "run", progress=False).run(until=2)
    meta = latest_checkpoint(tmp_path / "run") / "trainer.json"
    doc = json.loads(meta.read_text())
    doc["trainer"]["train_loader"] = {}
    meta.write_text(json.dumps(doc))
    with pytest.raises(FelixError, match=r"step-00000002: trainer.json has no data position for step 2"):
        Trainer(cfg, tmp_path / "run", resume=True, progress=False)


@pytest.mark.parametrize("load", [load_config, DataMix.load])
def test_yaml_that_is_not_utf8_names_the_file(tmp_path, load):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"model:\n  d_model: \xff\n")
    with pytest.raises(FelixError, match=r"bad.yaml: not UTF-8 text \(byte 18\)"):
        load(path)


def test_the_quail_margin_is_calibrated_in_fp32_under_a_bf16_run(tmp_path, tiny_mix):
    """bf16's rounding of the logits is noise the deployment format does not add: calibrating under the
    run's autocast measured it too (q8_0's shift nearly doubled)."""
    cfg = load_config(write_config(tmp_path, tiny_mix, dtype="bf16", eval_every=0),
                      ["quail.enabled=true", 'quail.tokens=["<|endoftext|>", "<|end|>"]', "quail.format=q8_0"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.dtype == torch.bfloat16
    trainer.quail.calibrate_if_due(trainer.state, trainer.model)
    loader, q = trainer._loader("val"), cfg.quail
    batches = [loader.next_batch() for _ in range(q.calibration_batches)]  # the same fixed val batches
    fp32 = calibrate_margin(trainer.model, batches, trainer.whitelist, q.format, q.percentile, q.calibration)
    assert trainer.state.quail_margin == pytest.approx(fp32, rel=1e-6)


def test_the_last_step_is_logged_whatever_log_every(tmp_path, tiny_mix):
    """With log_every past max_steps and no evaluation, metrics.jsonl stayed empty (the demo's plot then failed)."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=5, eval_every=0), ["train.log_every=100"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [5]


def test_a_val_split_too_short_to_evaluate_is_refused_before_step_one(tmp_path, tiny_mix):
    """Both sources' val splits (6k and 28k tokens) are shorter than one window (prose's train split, 28.7k, is
    not): found at the first evaluation, that was after eval_every steps of training."""
    cfg = load_config(write_config(tmp_path, tiny_mix, seq_len=28_500, eval_every=1000), ["model.max_seq_len=28500"])
    with pytest.raises(FelixError, match=r"mix.yaml: train.eval_every=1000 evaluates on the val split, but no source "
                                         r"of the mix has one window of 28501 tokens in its val split"):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_a_source_left_out_of_validation_is_named_with_its_share(tmp_path, tiny_mix):
    """prose's val split (6k tokens) is shorter than one window, code's (28k) is not: evaluation covers code alone."""
    cfg = load_config(write_config(tmp_path, tiny_mix, seq_len=8192, eval_every=1000), ["model.max_seq_len=8192"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
    notes = [str(w.message) for w in caught if "val split" in str(w.message)]
    assert notes == [f"{tiny_mix.mix_path}: sources whose val split is shorter than one window of seq_len+1 = 8193 "
                     f"tokens: 'prose' (30% of the mix); their val batches leave them out and draw from the other "
                     f"70% of the mix (code)"]
    assert trainer._loader("val").names == ["code"]


def test_an_evaluation_reading_a_source_past_its_val_windows_is_named(tmp_path, tiny_mix):
    """felix-50m's eval_sequences=128 on a small source's val split: the val stream went round its few windows again
    and again without a word, each evaluation reading the same text many times over."""
    def notes(eval_sequences: int) -> list[str]:
        cfg = load_config(write_config(tmp_path, tiny_mix, seq_len=2048, eval_every=1000,
                                       eval_sequences=eval_sequences), ["model.max_seq_len=2048"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(cfg, tmp_path / f"run-{eval_sequences}", progress=False).close()
        return [str(w.message) for w in caught if "each evaluation reads" in str(w.message)]

    said = notes(24)  # prose: 3 windows (6k tokens), drawn 7 times; code: 13 windows, drawn 17: not over twice
    assert len(said) == 1
    assert re.search(r"eval_sequences=24 val windows, over twice what some sources hold out \(prose \(3 windows, "
                     r"read 7 times\)\)", said[0]), said[0]
    assert notes(16) == []  # prose's 3 windows read 5 times: a little past its end


def test_init_from_a_checkpoint_with_nothing_left_to_train_is_refused(tmp_path, tiny_mix, capsys):
    from felix.cli import main

    cfg_path = write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=1, eval_every=0)
    Trainer(load_config(cfg_path), tmp_path / "a", progress=False).run()
    with pytest.raises(FelixError, match=r"--init-from .*a/checkpoints/step-00000002: the checkpoint is at step 2, "
                                         r"and train.max_steps is 2: nothing to train; pass train.max_steps=<more "
                                         r"than 2> .*or --init-weights-only"):
        Trainer(load_config(cfg_path), tmp_path / "b", init_from=tmp_path / "a", progress=False)
    capsys.readouterr()
    argv = ["train", "--config", str(cfg_path), "--init-from", str(tmp_path / "a"), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "c"), "train.max_steps=1"]) == 2  # past max_steps too
    assert "the checkpoint is at step 2, and train.max_steps is 1" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "b") is None and latest_checkpoint(tmp_path / "c") is None
    # --resume into an empty --out starts from --init-from's step, and says so (it said "from scratch")
    assert main([*argv, "--out", str(tmp_path / "d"), "--resume", "train.max_steps=3"]) == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "--resume" in line]
    assert said == [f"felix train: warning: --resume: no checkpoint in {tmp_path / 'd'} yet; starting from "
                    f"--init-from {tmp_path / 'a'}"]
    # one step trained, from step 2; no evaluation: its val loss is n/a, not None
    assert re.fullmatch(r"trained 1 step \(to step 3, 384 tokens in all\) in \d+\.\ds; loss \d+\.\d{4}, val n/a, "
                        r"[\d,]+ tok/s\n", out)


def test_a_resume_needs_only_out_its_config_is_the_runs_own(tmp_path, tiny_mix, capsys):
    """The README's `felix train --out DIR --resume` after a run started with overrides (its data paths)."""
    from felix.cli import main

    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0)),
                 "--out", str(run), "--no-progress", "train.lr=0.002"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--json", "train.max_steps=3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["steps"], summary["trained_steps"]) == (3, 1)
    norm = summary["grad_norm"]  # over the run's 3 steps, not this call's 1
    assert (norm["steps"], norm["clip"]) == (3, 1.0) and 0 < norm["median"] <= norm["max"]
    assert load_checkpoint(latest_checkpoint(run)).config.train.lr == 0.002  # the run's own config, kept
    assert main(["train", "--out", str(tmp_path / "new"), "--no-progress"]) == 2
    assert "--config is required (with --resume it defaults to the run's OUT/config.yaml)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "new"), "--resume", "--no-progress"]) == 2
    assert "new/config.yaml: no run config here to resume from; give --config" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, warned", [
    (["model.splice_every=3"], True),  # TINY has 2 layers: the first SpliceCore would be layer 2
    (["model.splice_every=2"], False),  # layer 1
    (["model.splice_every=0"], False),  # none, on purpose
    (["model.splice_every=3", "model.splice_rank=0"], False),  # likewise
])
def test_a_model_too_shallow_for_its_splice_every_is_warned_about(tmp_path, tiny_mix, overrides, warned):
    """Before, a model with no SpliceCore for want of layers trained without a word (`felix info` showed it)."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=1, eval_every=0), overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
    said = [str(w.message) for w in caught if "splice_every" in str(w.message)]
    assert said == (["config: model.n_layers (2) is below model.splice_every (3): the model has no SpliceCore "
                     "layer (the first is layer splice_every - 1); lower model.splice_every, or set it to 0 to "
                     "train without SpliceCore"] if warned else [])
    assert bool(trainer.model.splice_cores()) == (overrides == ["model.splice_every=2"])
