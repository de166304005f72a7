"""The fp16 recipe (`train.dtype: fp16`, for GPUs without bf16 tensor cores), run on the CPU: loss scaling, the
steps an overflow skips, and the scale through a checkpoint. No other test trains in fp16."""

from __future__ import annotations

import torch
from test_trainer import write_config

from felix.config import load_config
from felix.metrics import read_metrics
from felix.trainer import Trainer

# 2**24 and 2**23 over the step's 128 targets are past fp16's largest finite value (65504): the fused loss's
# backward makes inf gradients at both, so the run's first two steps overflow whatever the weights; the default
# 2**16 overflows none of this model's, so by step 9 at the latest steps apply
HIGH_SCALE = 2.0**24


def _fp16_trainer(cfg, out, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, out, resume=resume, progress=False)
    assert trainer.dtype == torch.float16 and trainer.scaler is not None
    if not resume:
        trainer.scaler.load_state_dict(trainer.scaler.state_dict() | {"scale": HIGH_SCALE})
    return trainer


def test_fp16_overflows_back_off_the_scale_and_a_resume_keeps_it(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, dtype="fp16", max_steps=12, ckpt_every=1, eval_every=0))
    result = _fp16_trainer(cfg, tmp_path / "ref").run()
    rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    # an overflow skips the step and halves the scale; it is not a bad step (no rollback: the run goes on)
    assert [r["loss_scale"] for r in rows[:2]] == [HIGH_SCALE / 2, HIGH_SCALE / 4]
    skipped = [r for r in rows if "skipped" in r]
    assert rows[:2] == skipped[:2]
    assert all(r["skipped"].startswith("fp16 gradients overflowed at loss scale") for r in skipped)
    assert result.skipped_steps == len(skipped)
    scales = [r["loss_scale"] for r in rows]
    assert scales == sorted(scales, reverse=True)  # backs off; grows only after 2000 clean steps
    applied = [r for r in rows if "skipped" not in r]
    assert applied and applied[0]["step"] <= 9
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in applied)
    # stopped after step 9 and resumed from its last checkpoint: the same losses and loss scales, bit for bit
    _fp16_trainer(cfg, tmp_path / "split").run(until=9)
    _fp16_trainer(cfg, tmp_path / "split", resume=True).run()
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [(r["loss"], r["loss_scale"]) for r in split] == [(r["loss"], r["loss_scale"]) for r in rows]
