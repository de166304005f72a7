"""QUAIL across a resume (the margin follows this run's quail settings, not the checkpoint's), and the warnings
for a whitelist that the data never holds (calibration at every position, a hinge that never fires)."""

from __future__ import annotations

import re
import warnings

import pytest
from test_trainer import write_config

from felix.config import load_config
from felix.metrics import read_metrics
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
    from felix.train_step import margin_source

    assert trainer.state.quail_margin == new[4]
    assert trainer.state.quail_margin_source == margin_source(trainer.cfg.quail)


def test_a_resume_with_the_same_quail_settings_keeps_the_margin_exactly(tmp_path, tiny_mix):
    path, run = _first_part(tmp_path, tiny_mix, [])
    old = _margins(run)[2]
    assert _resume(path, run, [])[1] == []
    assert _margins(run)[4] == old


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
