"""Edge cases of the quantization math and QUAIL: re-rounding weights already on a format's grid, the
survival report of a checkpoint with applied splices, and degenerate inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.checkpoint import latest_checkpoint
from felix.cli import main
from felix.config import ModelConfig, config_from_dict
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.objective import calibrate_margin
from felix.patches import PatchStack
from felix.quail import Whitelist, logit_noise, margin_from_noise, margin_shift, resolve_whitelist
from felix.quant_formats import FORMATS, get_format
from felix.quant_gptq import gptq_round
from felix.quantize import fake_quantize_model
from felix.shards import ShardSet
from felix.survival import compare, survival_report
from felix.trainer import Trainer


# -- re-rounding is the identity on the grid -----------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**16),
       # log2 of the weights' scale: anywhere, and often where a 4-bit block's fp16 scale is subnormal
       exponent=st.one_of(st.floats(-45, 10), st.floats(-30, -24)),
       kind=st.sampled_from(["normal", "equal", "one"]))
def test_fake_quant_of_a_fake_quantized_tensor_changes_nothing(name, exponent, seed, kind):
    """fake_quant(fake_quant(W)) == fake_quant(W) at every magnitude, subnormal scales included."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, fmt.block, generator=g, dtype=torch.float64)
    if kind == "equal":
        x = x[:, :1].expand(-1, fmt.block)
    elif kind == "one":
        x = x * (torch.arange(fmt.block) == seed % fmt.block)
    x = (x * 2.0**exponent).float()  # up to 2^10: every block scale fits fp16
    q = fmt.fake_quant(x)
    assert torch.equal(fmt.fake_quant(q), q)
    assert torch.equal(fmt.dequantize(fmt.quantize(q), q.shape), q)


def test_a_block_whose_rq4_scale_rounds_up_in_the_fp16_subnormals_is_stable():
    """absmax/c15 = 1.6·2⁻²⁴ stores d = 2·2⁻²⁴, where the absmax weight is nearer c14 than c15: its
    re-rounding derived a scale half as large and moved every weight of the block."""
    fmt = get_format("rq4")
    w = torch.zeros(1, 32)
    w[0, 0] = 1.6 * 2.0**-24 * fmt.max_abs
    w[0, 1] = -0.3 * w[0, 0]
    q = fmt.fake_quant(w)
    assert torch.equal(fmt.fake_quant(q), q)
    assert float(q.abs().max()) == float(fmt.block_scale(q).max()) * fmt.max_abs  # the extreme code


def test_gptq_with_a_diagonal_covariance_is_plain_rounding_for_tiny_blocks():
    """GPTQ pins each block's absmax to the extreme code; plain rounding must agree with it there."""
    fmt = get_format("rq4")
    g = torch.Generator().manual_seed(0)
    peak = 0.7 * 2.0**-24 * fmt.max_abs  # stores d = 2^-24, where the peak is nearest c14
    w = (torch.rand(4, 64, generator=g) * 2 - 1) * 0.6 * peak
    w[:, ::32] = peak
    assert torch.equal(gptq_round(w, torch.eye(64), fmt), fmt.fake_quant(w))


# -- survival of a checkpoint with applied splices ----------------------------------------------
# SpliceCore rank 16: a (16 x 128) and b (64 x 16) are RQ4 blocks (rank 4 would keep them as fp16)
TINY_MODEL = {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
              "max_seq_len": 64, "splice_every": 2, "splice_rank": 16}
TINY_TRAIN = {"seq_len": 32, "micro_batch_size": 4, "max_steps": 3, "lr": 3e-3, "warmup_steps": 1,
              "eval_every": 3, "eval_batches": 1, "ckpt_every": 3, "keep_last": 1, "dtype": "fp32", "threads": 1}


@pytest.fixture(scope="module")
def spliced_run(tmp_path_factory, tiny_mix) -> tuple[Path, str]:
    """A 3-step tiny checkpoint with one applied patch on SpliceCore layer 1, and a whitelist string: a
    single token that is common in the val split."""
    cfg = config_from_dict({"model": TINY_MODEL, "train": TINY_TRAIN,
                            "data": {"tokenizer": str(tiny_mix.tokenizer_path), "mix": str(tiny_mix.mix_path)}})
    run = tmp_path_factory.mktemp("survival_splices") / "run"
    Trainer(cfg, run, progress=False).run()
    ckpt = latest_checkpoint(run)
    model, tok, _ = load_model(ckpt)
    g = torch.Generator().manual_seed(0)
    core = model.splice_cores()[1]
    after = {"layers.1.mlp.splice.a": core.a.detach() + 0.2 * torch.randn(core.a.shape, generator=g),
             "layers.1.mlp.splice.b": core.b.detach() + 0.2 * torch.randn(core.b.shape, generator=g)}
    PatchStack.open(ckpt).apply(model, after, {"method": "test_patch"})
    val = np.concatenate(ShardSet.open(tiny_mix.root / "shards" / "code").tokens("val"))
    for tid in np.bincount(val).argsort()[::-1]:
        s = tok.decode([int(tid)])
        if tok.encode(s) == [int(tid)]:
            return ckpt, s
    raise AssertionError("no single-token string in the val split")


def _without_header(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("checkpoint", "format", "embeddings", "step", "splices")}


def test_survival_measures_the_edited_model_against_what_quantize_packs(spliced_run, tiny_mix, tmp_path, capsys):
    ckpt, token = spliced_run
    assert main(["quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(tmp_path / "art")]) == 0
    packed, tok, _ = load_model(tmp_path / "art")  # dequantized: exactly what the artifact computes
    edited, _, _ = load_model(ckpt, splices=True)  # full precision, the patch applied unrounded
    assert not torch.equal(edited.splice_cores()[1].a, load_model(ckpt)[0].splice_cores()[1].a)
    report = survival_report(ckpt, "rq4", [token], json_prompts=0, probe_limit=32, val_windows_per_source=2)
    assert report["splices"] | {"preserve_windows": None, "seconds": None} == {
        "patches": 1, "fact_edits": 0, "rounding": "gptq", "edit_share": 0.5, "preserve_windows": None,
        "seconds": None}
    whitelist = resolve_whitelist(tok, [token])
    want = compare(edited, packed, tok, whitelist, tiny_mix.mix_path, 32, 2, 32, 0)
    assert _without_header(report) == want
    unedited = load_model(ckpt)[0]  # what the report measured when it left the stack out
    assert want != compare(unedited, fake_quantize_model(unedited, "rq4"), tok, whitelist, tiny_mix.mix_path,
                           32, 2, 32, 0)

    capsys.readouterr()
    assert main(["quant", "survival", "--checkpoint", str(ckpt), "--format", "rq4", "--tokens", token,
                 "--json-prompts", "0", "--probe-limit", "32", "--val-windows", "2", "--splice-rounding", "plain",
                 "--json"]) == 0
    out = capsys.readouterr().out
    plain = json.loads(out.strip().splitlines()[-1])
    assert plain["splices"] == {"patches": 1, "fact_edits": 0, "rounding": "plain"}
    assert "1 patches applied" in out
    # plain: packing rounds the edited tensors to their nearest grid values
    want = compare(edited, fake_quantize_model(edited, "rq4"), tok, whitelist, tiny_mix.mix_path, 32, 2, 32, 0)
    assert _without_header(plain) == json.loads(json.dumps(want))


# -- QUAIL calibration --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["logit_noise", "margin_shift"])
def test_calibration_without_whitelisted_targets_skips_ignored_positions(method):
    """The fallback to every position leaves out the targets cross-entropy ignores (-100), as the
    objective does: margin_shift indexed the logits with -100 and crashed."""
    torch.manual_seed(0)
    model = FelixLM(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=16,
                                splice_every=1, splice_rank=4))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(1, 64, (2, 16))
    ignored = y.clone()
    ignored[:, :4] = -100
    whitelist = Whitelist((0,), ("x",))  # token 0 is never a target here
    margin = calibrate_margin(model, [(x, ignored)], whitelist, "rq4", 99.0, method)
    keep = ignored != -100
    with torch.no_grad():
        quant = fake_quantize_model(model, "rq4")
        z, zq = model.lm_head(model.final_hidden(x)[keep]), quant.lm_head(quant.final_hidden(x)[keep])
    if method == "margin_shift":
        assert margin == margin_from_noise(margin_shift(z, zq, ignored[keep]), 99.0) / 2
    else:
        assert margin == margin_from_noise(logit_noise(z, zq), 99.0)
