"""QUAIL across a resume (the margin follows this run's quail settings, not the checkpoint's; its calibration
measures the same val windows whatever the micro-batch size and ranks), and the warnings for a whitelist that the
data never holds (calibration at every position, a hinge that never fires)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer import write_config

from felix.checkpoint import checkpoint_dir
from felix.config import load_config
from felix.distributed import DistInfo
from felix.metrics import read_metrics
from felix.model import FelixLM
from felix.quail import resolve_whitelist
from felix.train_data import TrainData
from felix.train_quail import calibrate_on_val, margin_source
from felix.trainer import Trainer

# "(": common in the code source, so calibration and the hinge see whitelisted targets
QUAIL = ["quail.enabled=true", 'quail.tokens=["<|endoftext|>", "("]', "quail.protect_only=false",
         "quail.calibrate_every=0"]


def _margins(run) -> dict[int, float]:
    return {r["step"]: r["quail_margin"] for r in read_metrics(run / "metrics.jsonl")}


def _first_part(tmp_path, tiny_mix, overrides: list[str]):
    """Two steps of a four-step run, checkpointed at step 2; the config file and the run directory."""
    path = write_config(tmp_path, tiny_mix, max_steps=4, ckpt_every=2, eval_every=0)
    run = tmp_path / "run"
    Trainer(load_config(path, QUAIL + overrides), run, progress=False).run(until=2)
    return path, run


def _resume(path, run, overrides: list[str]) -> tuple[Trainer, list[str]]:
    """The run resumed to its end under `overrides`; the trainer and the QUAIL margin warnings given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(load_config(path, QUAIL + overrides), run, resume=True, progress=False)
        trainer.run()
    return trainer, [str(w.message) for w in caught if "QUAIL margin" in str(w.message)]


@pytest.mark.parametrize("before, after, want", [
    # a fixed margin in this run's config wins over the checkpoint's calibrated one
    ([], ["quail.margin=2.0"], r"margin [\d.e-]+, calibrated under rq4 .*quail.margin=2 applies from step 2"),
    # a fixed margin dropped for calibration, or calibration under another format: recalibrated at once
    (["quail.margin=3.0"], ["quail.margin=null"],
     r"margin 3, fixed \(quail.margin=3\); this run calibrates under rq4 .*recalibrating at step 2"),
    ([], ["quail.format=q8_0", "quail.percentile=50"], r"calibrated under rq4 at percentile 99 .* this run "
                                                       r"calibrates under q8_0 at percentile 50 .*step 2"),
    # another sample: calibration_batches (x micro-batch 4) or calibration_sequences; once unnoticed
    ([], ["quail.calibration_batches=1"], r"on 8 val windows; this run calibrates under rq4 .* on 4 val windows: "
                                          r"recalibrating at step 2; quail.calibration_sequences=8 keeps"),
    ([], ["quail.calibration_sequences=3"], r"on 8 val windows; .* on 3 val windows: recalibrating at step 2"),
])
def test_a_resume_with_other_quail_settings_uses_this_runs_margin(tmp_path, tiny_mix, before, after, want):
    """Before: the checkpoint's margin stayed for the rest of the run (calibrate_every 0 never recalibrates, and
    a fixed margin in the config replaced only a missing one), and nothing was said."""
    path, run = _first_part(tmp_path, tiny_mix, before)
    old = _margins(run)[2]
    trainer, said = _resume(path, run, before + after)
    assert len(said) == 1 and re.search(want, said[0]), said
    new = _margins(run)
    assert new[3] == new[4] != old
    if "quail.margin=2.0" in after:
        assert new[3] == 2.0
    # the new margin is recorded with what it came from, for the next resume to compare against
    assert trainer.state.quail_margin == new[4]
    assert trainer.state.quail_margin_source == margin_source(trainer.cfg.quail)


def test_a_resume_with_the_same_quail_settings_keeps_the_margin_exactly(tmp_path, tiny_mix):
    path, run = _first_part(tmp_path, tiny_mix, [])
    old = _margins(run)[2]
    assert _resume(path, run, [])[1] == []
    assert _margins(run)[4] == old



def test_a_margin_from_before_a_stretch_without_quail_is_not_reused(tmp_path, tiny_mix):
    """Before: a run resumed with QUAIL off kept the checkpoint's margin, and one resumed from it with QUAIL back on
    (the same settings, calibrate_every 0) held the whitelist to that margin, measured on the weights of steps ago."""
    path = write_config(tmp_path, tiny_mix, max_steps=6, ckpt_every=2, eval_every=0)
    run = tmp_path / "run"
    Trainer(load_config(path, QUAIL), run, progress=False).run(until=2)
    Trainer(load_config(path, ["quail.enabled=false"]), run, resume=True, progress=False).run(until=4)
    resumed = Trainer(load_config(path, QUAIL), run, resume=True, progress=False)
    assert resumed.state.quail_margin is None  # calibrated on its first step
    resumed.run()
    margins = {r["step"]: r.get("quail_margin") for r in read_metrics(run / "metrics.jsonl")}
    assert margins[3] is None and margins[5] == margins[6] != margins[2]

def test_a_whitelist_absent_from_the_data_is_warned_about_once(tmp_path, tiny_mix, capsys):
    """Before: calibration silently measured every position, and the hinge never fired without a word."""
    overrides = ["quail.enabled=true", 'quail.tokens=["<|end|>"]', "quail.calibrate_every=1"]
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=3, eval_every=0), overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, tmp_path / "run", progress=False).run()
    assert all(r["quail_positions"] == 0 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    said = [str(w.message) for w in caught if "hold no whitelisted target" in str(w.message)]
    assert len(said) == 1 and "['<|end|>']" in said[0] and "every target position" in said[0], said  # 3 calibrations
    err = capsys.readouterr().err
    assert err.count("the hinge never fired") == 1 and "none of the 3 training steps" in err and "<|end|>" in err


@pytest.mark.parametrize("before, after, want, calibrated", [
    # once at the start, now every 3 steps: the next at step 3 (where a run with it from the start calibrates)
    ([], ["quail.calibrate_every=3"], r"calibrated its QUAIL margin once, at the start, this run every 3 steps "
                                      r"\(quail.calibrate_every\): its margin [\d.e-]+ is kept, the next "
                                      r"calibration at step 3", 3),
    (["quail.calibrate_every=2"], ["quail.calibrate_every=0"], r"every 2 steps, this run once, at the start .*kept, "
                                                               r"no more calibrations", None),
])
def test_a_resume_with_another_calibrate_every_keeps_the_margin_and_follows_the_new_schedule(
        tmp_path, tiny_mix, before, after, want, calibrated):
    """Before: nothing was said, and the schedule changed silently."""
    path, run = _first_part(tmp_path, tiny_mix, before)
    old = _margins(run)[2]
    trainer, said = _resume(path, run, before + after)
    assert len(said) == 1 and re.search(want, said[0]), said
    new = _margins(run)
    assert new[3] == old  # kept, not recalibrated at the resume step
    assert (new[4] != old) if calibrated == 3 else (new[4] == old)
    assert trainer.state.quail_margin_source == margin_source(trainer.cfg.quail)


@pytest.mark.parametrize("after, recalibrated", [([], False), (["quail.calibration_batches=1"], True)])
def test_a_checkpoint_that_did_not_record_its_calibration_sample_is_compared_by_its_config(tmp_path, tiny_mix, after,
                                                                                          recalibrated):
    """Checkpoints written before felix recorded the sample and schedule (margin source without "sequences" and
    "every", config without calibration_sequences): those of its config, calibration_batches x micro_batch_size,
    stand in. The same settings keep the margin without a word; another sample recalibrates."""
    path, run = _first_part(tmp_path, tiny_mix, [])
    old = _margins(run)[2]
    meta = checkpoint_dir(run) / "step-00000002" / "trainer.json"
    doc = json.loads(meta.read_text())
    for key in ("sequences", "every"):
        del doc["trainer"]["quail_margin_source"][key]
    del doc["config"]["quail"]["calibration_sequences"]
    meta.write_text(json.dumps(doc))
    trainer, said = _resume(path, run, after)
    assert len(said) == recalibrated, said
    assert (_margins(run)[3] != old) == recalibrated
    assert trainer.state.quail_margin_source == margin_source(trainer.cfg.quail)


def test_calibration_measures_the_same_windows_whatever_the_micro_batch(tmp_path, tiny_mix):
    """A resume with a smaller micro-batch (and more accumulation) calibrated on calibration_batches of the new
    micro-batches: 2 val windows where the run had measured 8. The run's config.yaml pins 8 now."""
    path, run = _first_part(tmp_path, tiny_mix, [])
    margins = []
    for micro in (4, 1):
        cfg = load_config(run / "config.yaml",
                          [f"train.micro_batch_size={micro}", f"train.grad_accum_steps={4 // micro}"])
        trainer = Trainer(cfg, run, resume=True, progress=False)
        assert trainer.cfg.quail.calibration_sequences == 8
        trainer.state.quail_margin = None  # measure it now, on the checkpoint's weights
        trainer.quail.calibrate_if_due(trainer.state, trainer.model)
        trainer.close()
        margins.append(trainer.state.quail_margin)
    assert margins[1] == pytest.approx(margins[0], rel=1e-5)


def _calibrate_on(rank: int, world_size: int, config: Path, out: Path) -> None:
    """Rank `rank` of `world_size` (a gloo group beside `out`): the calibrated margin of a seeded tiny model."""
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{out.parent / 'init'}", rank=rank, world_size=world_size)
    try:
        cfg = load_config(config, QUAIL)
        info = DistInfo(rank, world_size, rank, world_size)
        data = TrainData.open(cfg, info)
        torch.manual_seed(0)
        model = FelixLM(cfg.model)
        margin, count = calibrate_on_val(model, data.val_stream(cfg), resolve_whitelist(data.tokenizer,
                                         cfg.quail.tokens), cfg.quail, cfg.train.micro_batch_size,
                                         info, torch.device("cpu"))
        out.with_name(f"{out.name}-{rank}").write_text(json.dumps([margin, count]))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@pytest.mark.slow  # two processes that import torch: seconds each on a loaded machine
def test_every_rank_calibrates_the_margin_one_process_does(tmp_path, tiny_mix):
    """Under torchrun each rank measured its own calibration_batches micro-batches and the ranks averaged their
    margins: twice the windows, and another estimate, on two ranks. Now every rank measures the same windows."""
    config = write_config(tmp_path, tiny_mix, micro_batch_size=2)
    _calibrate_on(0, 1, config, tmp_path / "one")
    mp.start_processes(_calibrate_on, args=(2, config, tmp_path / "two"), nprocs=2, start_method="spawn")
    one = json.loads((tmp_path / "one-0").read_text())
    assert one[1] > 0  # whitelisted targets among the 4 windows: the margin is theirs
    for rank in (0, 1):
        margin, count = json.loads((tmp_path / f"two-{rank}").read_text())
        assert margin == pytest.approx(one[0], rel=1e-6) and count == one[1]
