"""felix.splice_diagnose on small random models (no training): attribution through both readers of the
MLP keys, CCI edge cases, clear errors for inputs it cannot diagnose, and the model's state after."""

from __future__ import annotations

import json

import pytest
import torch

from felix.config import ModelConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.splice_diagnose import attributions, diagnose, logit_lens
from felix.splice_examples import Example

EX = Example((1, 2, 3, 4, 5, 6), 5)


def _model(**overrides) -> FelixLM:
    """4 layers, SpliceCore at 1 and 3 with a non-zero B (trained models have one: B trains from step 0)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**({"vocab_size": 61, "n_layers": 4, "d_model": 32, "n_heads": 4, "d_ff": 64,
                          "max_seq_len": 16, "splice_every": 2, "splice_rank": 4} | overrides))
    model = FelixLM(cfg).eval()
    with torch.no_grad():
        for core in model.splice_cores().values():
            core.b.normal_(std=0.5)
    return model


def _metric(model: FelixLM, target: int, predicted: int, zero_channel: tuple[int, int] | None = None) -> float:
    """m with channel j of layer L's u zeroed wherever u is read (W_down and the SpliceCore)."""
    hooks = []
    if zero_channel is not None:
        L, j = zero_channel

        def zero(_m, args):
            u = args[0].clone()
            u[0, -1, j] = 0
            return (u,)

        mlp = model.layers[L].mlp
        hooks = [mlp.down_proj.register_forward_pre_hook(zero), mlp.splice.register_forward_pre_hook(zero)]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([EX.ids[: EX.n_prompt]]))[0, -1], -1)
    for h in hooks:
        h.remove()
    return float(lp[target] - lp[predicted])


def test_attribution_follows_u_into_the_splicecore():
    """Before: the gradient reached u only through W_down, so with W_down = 0 every effect was 0 although
    zeroing a channel moves m through the SpliceCore."""
    model = _model()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.zero_()
    target, predicted = EX.ids[-1], 7
    eff = attributions(model, [EX], [(target, predicted)], layers=[1])[1]
    j = int(eff.argmax())
    exact = abs(_metric(model, target, predicted, (1, j)) - _metric(model, target, predicted))
    assert exact > 1e-4 and float(eff[j]) == pytest.approx(exact, rel=0.2)


def test_diagnose_refuses_what_it_cannot_measure_with_a_clear_error():
    """Before: RuntimeError/IndexError from deep inside torch (empty prompt, no target, no SpliceCore
    layers, a bad k or layer)."""
    model = _model()
    for ex in (Example((1, 2), 0), Example((1, 2), 2)):
        with pytest.raises(FelixError, match="at least one prompt token and one target token"):
            diagnose(model, None, ex)
    with pytest.raises(FelixError, match="no SpliceCore layers"):
        diagnose(_model(splice_every=0), None, EX)
    for k in (0, -1):
        with pytest.raises(FelixError, match="k must be at least 1"):
            diagnose(model, None, EX, k=k)
    with pytest.raises(FelixError, match=r"layers \[9\]: the model has layers 0\.\.3"):
        attributions(model, [EX], layers=[9])
    assert attributions(_model(splice_every=0), [EX]) == {}


def test_k_above_the_channel_count_covers_every_channel():
    """Before: `topk(k)` past d_ff raised 'selected index k out of range'."""
    d = diagnose(_model(), None, EX, k=1000)
    assert d["cci@1000"] == pytest.approx(1.0)
    assert all(sorted(v["top_components"]) == list(range(64)) for v in d["layers"].values())


def test_train_mode_with_activation_checkpointing_gives_the_eval_answer_and_is_restored():
    """Before: checkpointing recomputed the blocks in backward, re-ran the hooks and left the leaves that
    held the gradient orphaned (TypeError on `grad[0, -1]`)."""
    model = _model()
    want = diagnose(model, None, EX)
    model.train()
    model.activation_checkpointing = True
    model.layers[0].eval()  # a submodule's own mode must survive too
    assert diagnose(model, None, EX) == want
    assert model.training and model.layers[1].training and not model.layers[0].training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_zero_effect_is_finite_json_and_diagnosis_is_deterministic():
    """With nothing reaching m through u (W_down and B zero), CCI and shares are 0, not NaN."""
    model = _model()
    with torch.no_grad():
        for L in (1, 3):
            model.layers[L].mlp.down_proj.weight.zero_()
            model.layers[L].mlp.splice.b.zero_()
    d = diagnose(model, None, EX)
    assert d["cci@5"] == 0.0 and not d["allowed_finetune"] and len(d["chosen_layers"]) == 1
    assert all(v["attribution_share"] == 0.0 and v["cci"] == 0.0 for v in d["layers"].values())
    json.dumps(d, allow_nan=False)
    assert diagnose(model, None, EX) == d


def test_logit_lens_reads_each_block_through_the_final_norm_and_tied_head():
    model = _model()
    lens = logit_lens(model, None, EX)
    idx = torch.tensor([EX.ids[: EX.n_prompt]])
    with torch.no_grad():
        assert lens[-1]["target_prob"] == pytest.approx(float(torch.softmax(model(idx)[0, -1], -1)[EX.ids[-1]]))
        h = model.residual_through(idx, 1)[0, -1]
        probs = torch.softmax(model.norm(h) @ model.tok_emb.weight.T, -1)
    assert lens[1]["target_prob"] == pytest.approx(float(probs[EX.ids[-1]]))
    assert lens[1]["top_token"] == str(int(probs.argmax())) and [r["splice"] for r in lens] == [0, 1, 0, 1]


def test_the_gates_read_cci_at_5_whatever_k_is_reported():
    """Before: `allowed_*` compared CCI@k for the k asked, so `--k 64` called a diffuse edit allowed (brief §5's
    gates are on CCI@5). The pooled CCI@5 is reported beside CCI@k."""
    model = _model(d_ff=256)
    five, wide = diagnose(model, None, EX), diagnose(model, None, EX, k=64)
    assert wide["cci@64"] > 0.5 > 0.3 > five["cci@5"]  # a diffuse pool: the wide k alone would pass the gates
    assert not wide["allowed_cheap"] and not wide["allowed_finetune"]
    assert wide["cci@5"] == five["cci@5"]


def test_diagnosis_names_tokens_by_id_too():
    """Before: tokens were named by their text alone, and every piece of a multi-byte character decodes to
    "\\ufffd", so a target the model did not predict read as the prediction (' �' and ' �')."""
    model = _model()
    d = diagnose(model, None, EX)
    with torch.no_grad():
        predicted = int(model(torch.tensor([EX.ids[: EX.n_prompt]]))[0, -1].argmax())
    assert (d["target_id"], d["predicted_id"]) == (EX.ids[EX.n_prompt], predicted)
    assert [r["top_id"] for r in d["logit_lens"]] == [int(r["top_token"]) for r in d["logit_lens"]]
