"""A QUAIL straight-through step that goes non-finite because a weight overflows the training format's block
scale says which tensor and why, in the bad-step warning, the skipped row and the error that stops the run."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TINY, write_config

from felix.config import ModelConfig, load_config
from felix.errors import FelixError
from felix.metrics import read_metrics
from felix.model import FelixLM
from felix.quail import fake_quant_failure
from felix.trainer import Trainer

QUAIL_STE = ["quail.enabled=true", 'quail.tokens=[".", ","]', "quail.margin=1.0", "quail.protect_only=false",
             "quail.ste=true"]
OVERFLOWS_RQ4 = 1e6  # absmax / max|codebook| is past fp16's 65504: rq4's block scale is inf


def tiny_model() -> FelixLM:
    torch.manual_seed(0)
    return FelixLM(ModelConfig(**TINY["model"]))


def test_a_healthy_model_has_no_diagnosis():
    assert fake_quant_failure(tiny_model(), "rq4") is None


def test_overflowing_tensors_are_named_with_the_format_and_a_hint():
    model = tiny_model()
    params = dict(model.named_parameters())
    names = [name for name in params if ".mlp.up_proj." in name or ".mlp.down_proj." in name]  # in model order
    assert len(names) == 4
    with torch.no_grad():
        for name in names:
            params[name][0, 0] = OVERFLOWS_RQ4
    why = fake_quant_failure(model, "rq4")
    assert f"(rq4) overflows a block scale in {', '.join(names[:3])} and 1 more (|weight| up to 1e+06)" in why
    assert "lower train.lr" in why and "quail.format whose scale is wider" in why
    assert fake_quant_failure(model, "nf4") is None  # fp32 scales hold it


def test_non_finite_weights_are_reported_as_such_not_as_an_overflow():
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] = OVERFLOWS_RQ4
        model.layers[1].attn_norm.weight[0] = float("nan")
    why = fake_quant_failure(model, "rq4")
    assert "NaN/inf in layers.1.attn_norm.weight" in why and "down_proj" not in why


def test_trainer_names_the_overflowing_tensor_when_it_gives_up(tmp_path, tiny_mix, capsys):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=4, ckpt_every=4, max_bad_steps=2, eval_every=0),
                      QUAIL_STE)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with torch.no_grad():  # the full-precision forward stays finite: only the rq4 hinge goes NaN
        trainer.model.layers[0].mlp.down_proj.weight[0, 0] = OVERFLOWS_RQ4
    with pytest.raises(FelixError, match=r"no checkpoint to roll back to \(last: non-finite .*"
                                         r"\(rq4\) overflows a block scale in layers\.0\.mlp\.down_proj\.weight"):
        trainer.run()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(warnings) == 2 and all("layers.0.mlp.down_proj.weight" in line for line in warnings)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # step 2 gave up: its row is logged too
    assert all("layers.0.mlp.down_proj.weight" in r["skipped"] for r in rows)


def test_under_fp16_an_overflowing_block_is_a_bad_step_at_once_not_a_loss_scale_overflow(tmp_path, tiny_mix, capsys):
    """The hinge's NaN gradient beside a finite loss looks like an fp16 overflow: the scale halved at every step
    (about 17 times, to below 1) before a step counted as bad, and the run carried on with a ruined loss scale."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=4, ckpt_every=4, max_bad_steps=2, eval_every=0,
                                   dtype="fp16"), QUAIL_STE)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with torch.no_grad():  # within fp16's range (the forward stays finite), past rq4's: its block scale is inf
        trainer.model.layers[0].mlp.down_proj.weight[0, 0] = 3e4
    with pytest.raises(FelixError, match=r"2 bad steps in a row .*overflows a block scale in layers\.0\.mlp"):
        trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("down_proj" in r["skipped"] for r in rows)
    assert "loss scale now" not in capsys.readouterr().err
