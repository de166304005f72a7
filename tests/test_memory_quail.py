"""The training-memory prediction with QUAIL: it runs the trainer's objective (the hinge, and quail.ste's
second, fake-quantized forward without checkpointing) under fake tensors and equals a real step."""

from __future__ import annotations

import pytest
import torch

from felix.config import config_from_dict
from felix.fake_values import KnownValues
from felix.memory import (
    QUAIL_TARGET_SHARE,
    measure_step_memory,
    quail_memory_whitelist,
    rss_step_memory,
    train_memory_bytes,
)
from felix.model import FelixLM
from felix.quantize import quantizable_params

TINY = {"model": {"vocab_size": 512, "n_layers": 1, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
                  "splice_every": 1, "splice_rank": 4},
        "train": {"seq_len": 32, "micro_batch_size": 2, "dtype": "fp32", "threads": 2}}
STE = {"enabled": True, "tokens": ["<|endoftext|>"], "ste": True}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype, train", [("bf16", {"grad_accum_steps": 2, "activation_checkpointing": True}),
                                          ("fp32", {})])
def test_quail_ste_prediction_equals_a_real_step_and_holds_the_quantized_pass(dtype, train):
    """The fake-tensor prediction ignored QUAIL: quail.ste's forward on fake-quantized weights (no activation
    checkpointing, kept for backward) was missing. It now runs the trainer's objective, rq4 codebooks and the
    data-dependent `h[mask]` included, and equals the same tracker on a real CPU step byte for byte."""
    raw = TINY | {"train": TINY["train"] | train}
    cfg = config_from_dict(raw | {"quail": STE})
    predicted = train_memory_bytes(cfg, dtype, "cpu")
    assert measure_step_memory(cfg, torch.device("cpu"), DTYPES[dtype]) == predicted
    plain = measure_step_memory(config_from_dict(raw), torch.device("cpu"), DTYPES[dtype])
    # At least the quantized weight copies the pass's linears save for backward (bf16: the autocast copies).
    model = FelixLM(cfg.model)
    weights = dict(model.named_parameters())
    quantized = sum(weights[name].numel() for name, _ in quantizable_params(model, cfg.quail.format))
    assert predicted - plain >= quantized * DTYPES[dtype].itemsize


@pytest.mark.slow  # a subprocess: ~30 s on 2 cores
def test_quail_ste_prediction_is_within_15_percent_of_the_kernels_rss():
    """Independent of the tracker: a fresh process's peak RSS over the same QUAIL+STE steps (1.06x the
    prediction when measured; a plain step is 1.04x). Big enough that glibc mmaps the tensors."""
    medium = {"model": {"vocab_size": 4096, "n_layers": 2, "d_model": 256, "n_heads": 4, "d_ff": 768,
                        "max_seq_len": 256, "splice_every": 2, "splice_rank": 8},
              "train": {"seq_len": 256, "micro_batch_size": 4, "dtype": "fp32", "threads": 2}, "quail": STE}
    cfg = config_from_dict(medium)
    assert rss_step_memory(cfg, "fp32") == pytest.approx(train_memory_bytes(cfg, "fp32", "cpu"), rel=0.15)


def test_info_memory_includes_the_straight_through_pass_and_says_what_it_assumes():
    from felix.commands.info import model_info

    plain = model_info(config_from_dict(TINY))
    ste = model_info(config_from_dict(TINY | {"quail": STE}))
    assert ste["train_memory_bytes"] > plain["train_memory_bytes"]
    assumes = ste["train_memory_assumes"]
    assert "1 in 32 target positions whitelisted" in assumes and "rq4 fake-quantized" in assumes
    assert "excludes" not in assumes and "QUAIL" not in plain["train_memory_assumes"]


def test_known_values_size_a_whitelist_mask_under_fake_tensors():
    """Boolean indexing has a data-dependent size that fake tensors refuse; KnownValues computes the tokens
    and the mask for real, so `h[mask]`, its backward and `int(mask.sum())` see the real count."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    whitelist = quail_memory_whitelist(32768)
    assert len(whitelist.ids) == 1024  # the documented share of a 32K vocabulary
    expected = whitelist.mask(torch.randint(0, 32768, (4, 2048), generator=torch.Generator().manual_seed(0)))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode, KnownValues(fake_mode, 4 * 2049):
        tokens = torch.randint(0, 32768, (4, 2048), generator=torch.Generator().manual_seed(0))
        mask = whitelist.mask(tokens)
        h = torch.randn(4, 2048, 8, requires_grad=True)
        picked = h[mask]
        picked.sum().backward()
        count = int(mask.sum())
        assert tuple(picked.shape) == (int(expected.sum()), 8) and count == int(expected.sum())
        assert tuple(h.grad.shape) == (4, 2048, 8) and tuple(tokens[mask].shape) == (count,)
        with pytest.raises(RuntimeError, match="does not know"):  # a mask made from fake floats has no value
            h[torch.rand(4, 2048) > 0.5]
    # uniformly random targets hit the whitelist at the assumed rate
    assert count / tokens.numel() == pytest.approx(QUAIL_TARGET_SHARE, rel=0.15)


def test_quail_prediction_sizes_the_loss_chunk_of_the_device_trained_on():
    # The objective's cross-entropy uses the model's loss chunk as FelixLM's own loss does: a GPU's 1,024
    # rows at vocab 32K, not the CPU's 64 that fake tensors would otherwise pick (QUAIL predicted less
    # memory than no QUAIL).
    raw = {"model": {"vocab_size": 32768, "n_layers": 1, "d_model": 64, "n_heads": 2, "d_ff": 128,
                     "max_seq_len": 1024, "splice_every": 1, "splice_rank": 4},
           "train": {"seq_len": 1024, "micro_batch_size": 2}}
    plain = train_memory_bytes(config_from_dict(raw), "bf16", "cuda")
    quail = train_memory_bytes(config_from_dict(raw | {"quail": {"enabled": True, "tokens": ["x"]}}), "bf16", "cuda")
    assert quail > plain
