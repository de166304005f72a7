"""TrainConfig refuses values that would crash the trainer or silently train something else."""

from __future__ import annotations

import pytest

from felix.config import config_from_dict
from felix.errors import FelixError

TRAIN = {"seq_len": 16, "max_steps": 100, "warmup_steps": 10}
MODEL = {"vocab_size": 64, "n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "max_seq_len": 16}


def train_config(**train):
    return config_from_dict({"model": MODEL, "train": TRAIN | train}, "run.yaml").train


@pytest.mark.parametrize(("field", "value", "msg"), [
    ("log_every", 0, "log_every must be positive"),
    ("ckpt_every", 0, "ckpt_every must be positive"),
    ("eval_batches", 0, "eval_batches must be positive"),
    ("eval_sequences", 0, r"eval_sequences must be positive \(or null for eval_batches x micro_batch_size\)"),
    ("max_bad_steps", 0, "max_bad_steps must be positive"),
    ("max_rollbacks", -1, "max_rollbacks must be >= 0"),
    ("eval_every", -1, "eval_every must be >= 0"),
    ("seed", -1, "seed must be >= 0"),
    ("threads", -2, "threads must be >= 1"),
    ("grad_clip", -1.0, "grad_clip must be > 0"),
    ("grad_clip", 0.0, "grad_clip must be > 0"),
    ("min_lr_ratio", 2.0, r"min_lr_ratio must be in \[0, 1\]"),
    ("min_lr_ratio", -0.5, r"min_lr_ratio must be in \[0, 1\]"),
    ("lr", float("nan"), "lr must be positive and finite"),
    ("lr", float("inf"), "lr must be positive and finite"),
    ("beta1", 1.5, r"beta1 must be in \[0, 1\)"),
    ("beta2", 1.0, r"beta2 must be in \[0, 1\)"),
    ("eps", -1e-8, "eps must be positive and finite"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("spike_factor", 0.5, r"spike_factor must be 0 \(off\) or > 1"),
    ("decay_start_step", 100, r"decay_start_step \(100\) must be in \[warmup_steps, max_steps\) = \[10, 100\)"),
    ("decay_start_step", 5, r"decay_start_step \(5\) must be in"),
    ("peak_flops", 0.0, "peak_flops must be positive and finite"),
    ("peak_flops", float("inf"), "peak_flops must be positive and finite"),
])
def test_nonsense_is_refused_naming_the_field(field, value, msg):
    with pytest.raises(FelixError, match=f"run.yaml: train: .*{msg}"):
        train_config(**{field: value})


def test_edge_values_that_mean_something_are_kept():
    tc = train_config(grad_clip=float("inf"), threads=0, min_lr_ratio=1.0, spike_factor=0, eval_every=0, seed=0,
                      beta1=0.0, weight_decay=0.0, max_rollbacks=0, decay_start_step=10)
    assert tc.grad_clip == float("inf") and tc.threads == 0 and tc.decay_start_step == 10
    assert train_config(decay_start_step=99).decay_start_step == 99


def test_eval_sequences_unset_is_resolved_once_so_a_later_micro_batch_keeps_it():
    tc = train_config(micro_batch_size=4, eval_batches=3)
    assert tc.eval_sequences == 12 and config_from_dict({"model": MODEL, "train": tc.model_dump()}).train == tc
    tc.micro_batch_size = 2  # validate_assignment runs the validators again: the resolved value stays
    assert tc.eval_sequences == 12 and train_config(eval_sequences=5, micro_batch_size=4).eval_sequences == 5
