"""Splice edits on a tiny trained model: request format, measurements, both methods, the budget,
diagnosis, and the bench metrics' definitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from splice_helpers import counterfactual, train_tiny  # noqa: E402

from felix.checkpoint import load_model
from felix.config import ModelConfig
from felix.errors import FelixError
from felix.generate import generate
from felix.model import FelixLM
from felix.splice_bench import jaccard, spearman
from felix.splice_closed import (
    _keys,
    _null_projector,
    closed_form,
    closed_form_a,
    input_covariance,
    inputs_at_targets,
    preserved_covariance,
    solve_a_update,
)
from felix.splice_data import context_variants, corpus_windows
from felix.splice_diagnose import attributions, cci, diagnose, logit_lens
from felix.splice_edit import (
    EditConfig,
    EditContext,
    EditRequest,
    Example,
    greedy_continuations,
    greedy_hits,
    heldout_nll,
    kl_train,
    load_requests,
    make_example,
    propose_edit,
    save_requests,
    splice_names,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_mix):
    ckpt_path = train_tiny(tmp_path_factory.mktemp("splice_tiny"), tiny_mix)
    model, tok, ckpt = load_model(ckpt_path)
    heldout = corpus_windows(ckpt, "val", 8, 32)
    preserve = corpus_windows(ckpt, "train", 8, 32, seed=1)
    return model, tok, ckpt, heldout, preserve


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory, tiny_mix):
    """The tiny model with SpliceCore rank 16 of d_model 64. closed_form_a writes only inside span(b),
    and a rank-4 span cannot make a counterfactual greedy (docs/splicing.md, "SpliceCore rank")."""
    model, tok, ckpt = load_model(train_tiny(tmp_path_factory.mktemp("splice_wide"), tiny_mix, splice_rank=16))
    return model, tok, ckpt, corpus_windows(ckpt, "val", 8, 32), corpus_windows(ckpt, "train", 8, 32, seed=1)


# -- request format -------------------------------------------------------------------------------------


def test_requests_round_trip_and_validate(tmp_path):
    reqs = [EditRequest("import ", "os", ["from x import "], ["def f("], id="a"), EditRequest("x = ", "1")]
    save_requests(tmp_path / "e.jsonl", reqs)
    assert load_requests(tmp_path / "e.jsonl") == reqs
    assert "id" not in json.loads((tmp_path / "e.jsonl").read_text().splitlines()[1])
    for bad, msg in [({"prompt": "a"}, "'target'"), ({"prompt": "a", "target": "b", "x": 1}, "unknown keys"),
                     ({"prompt": "a", "target": "b", "neutral": "c"}, "'neutral'"), ([1], "JSON object")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(FelixError, match=msg):
            load_requests(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FelixError, match="no edit requests"):
        load_requests(tmp_path / "empty.jsonl")


# -- measurements ---------------------------------------------------------------------------------------


def test_greedy_hits_agree_with_decoding():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=32, splice_every=1)
    model = FelixLM(cfg).eval()
    exs = []
    for i in range(6):
        prompt = [(7 * i + j) % 61 for j in range(3 + i)]
        gen = generate(model, prompt, 3, greedy=True)
        exs += [Example(tuple(prompt + gen), len(prompt)), Example(tuple(prompt + gen[:2] + [(gen[2] + 1) % 61]),
                                                                   len(prompt))]
    assert greedy_hits(model, exs) == [True, False] * 6


def test_logit_lens_last_block_is_the_model_output_and_cci_is_a_share(tiny):
    model, tok, *_ = tiny
    ex = counterfactual(model, tok)
    lens = logit_lens(model, tok, ex)
    assert [r["layer"] for r in lens] == [0, 1, 2, 3] and [r["splice"] for r in lens] == [False, True, False, True]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ex.ids[: ex.n_prompt]]))[0, -1], -1)
    assert lens[-1]["target_prob"] == pytest.approx(float(probs[ex.ids[-1]]), rel=1e-4)
    assert lens[-1]["target_rank"] == 21
    assert cci(torch.tensor([0.0, 5.0, 0.0]), 1) == 1.0 and cci(torch.ones(10), 5) == pytest.approx(0.5)
    d = diagnose(model, tok, ex)
    assert set(d["chosen_layers"]) <= {1, 3} and d["chosen_layers"]
    assert sum(v["attribution_share"] for v in d["layers"].values()) == pytest.approx(1.0)
    assert 0 < d["cci@5"] <= 1 and d["allowed_finetune"] == (d["cci@5"] > 0.3)


def test_attribution_estimates_ablation_of_a_channel(tiny):
    """Attribution patching is a first-order estimate of zeroing one d_ff channel: the strongest
    channel's estimate has the sign and rough size of the exact ablation effect."""
    model, tok, *_ = tiny
    ex = counterfactual(model, tok)
    target, pred = ex.ids[-1], None
    with torch.no_grad():
        pred = int(model(torch.tensor([ex.ids[:-1]]))[0, -1].argmax())
    eff = attributions(model, [ex], [(target, pred)], layers=[3])[3]
    j = int(eff.argmax())

    def metric(hook=None):
        h = model.layers[3].mlp.down_proj.register_forward_pre_hook(hook) if hook else None
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ex.ids[:-1]]))[0, -1], -1)
        if h:
            h.remove()
        return float(lp[target] - lp[pred])

    def zero_j(_m, args):
        u = args[0].clone()
        u[0, -1, j] = 0
        return (u,)

    exact = abs(metric(zero_j) - metric())
    assert exact == pytest.approx(float(eff[j]), rel=0.5)


def test_bench_statistics():
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    x = torch.tensor([0.1, 0.5, 0.2, 0.9])
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)


# -- methods --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kl_train", "closed_form", "closed_form_a"])
def test_methods_write_only_splicecore_and_make_the_target_greedy(tiny, tiny_wide, method):
    if method == "closed_form_a":  # it writes inside span(b) only: a nearer counterfactual, two layers
        model, tok, _, heldout, preserve = tiny_wide
        ex, layers = counterfactual(model, tok, rank=1), [1, 3]
    else:
        model, tok, _, heldout, preserve = tiny
        ex, layers = counterfactual(model, tok), [3]
    full0 = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = EditContext(preserve, [tok.encode("import "), tok.encode("return ")])
    cfg = EditConfig(method=method, steps=40, lr=3e-2)
    fn = {"kl_train": kl_train, "closed_form": closed_form, "closed_form_a": closed_form_a}[method]
    after = fn(model, ex, layers, ctx, cfg)
    # the method leaves the model as it was; what it would write are SpliceCore tensors of `layers` only
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in full0.items())
    written = {"kl_train": ("a", "b"), "closed_form": ("b",), "closed_form_a": ("a",)}[method]
    assert set(after) == set(splice_names(layers, written))
    for name in after:
        assert float((after[name] - full0[name]).norm()) > 0
    model.load_splice_state(after, strict=False)
    try:
        assert greedy_hits(model, [ex]) == [True]
    finally:
        model.load_splice_state({k: full0[k] for k in after}, strict=False)


def test_kl_train_on_b_with_sgd_moves_b_only(tiny):
    """train="b" moves b alone; a bad choice of tensors is a clear error."""
    model, tok, _, heldout, preserve = tiny
    ex = counterfactual(model, tok)
    ctx = EditContext(preserve, [tok.encode("import ")])
    b0 = model.splice_state()["layers.3.mlp.splice.b"].clone()
    after = kl_train(model, ex, [3], ctx, EditConfig(steps=5, lr=1.0, train="b", optimizer="sgd", margin=1e9))
    assert set(after) == {"layers.3.mlp.splice.b"}
    delta = after["layers.3.mlp.splice.b"] - b0  # (d_out, rank)
    assert float(delta.norm()) > 0
    with pytest.raises(FelixError, match="train must be ab or b"):
        kl_train(model, ex, [3], ctx, EditConfig(train="a"))


def test_nullspace_protection_keeps_protected_keys_fixed(tiny):
    """AlphaEdit-style: the update lies in the null space of the preserved keys' covariance, so an
    earlier edit whose keys are protected gets exactly the same SpliceCore output."""
    model, tok, _, _, preserve = tiny
    ex = counterfactual(model, tok)
    prior = counterfactual(model, tok, "import ")
    cfg = EditConfig(method="closed_form", protect="nullspace", null_tol=0.5)
    b0 = model.splice_cores()[3].b.detach().clone()
    after = closed_form(model, ex, [3], EditContext(preserve[:2], [], [prior]), cfg)
    P = _null_projector(preserved_covariance(model, [3], preserve[:2])[3], 0.5)
    db = after["layers.3.mlp.splice.b"] - b0
    assert float((db @ (torch.eye(P.shape[0]) - P)).abs().max()) <= 1e-5 * float(db.abs().max())
    kp = _keys(model, [3], [prior])[3]
    assert float((db @ kp).norm()) < 0.05 * float(db.norm() * kp.norm()) + 1e-6


def test_a_update_writes_the_codes_keeps_prior_keys_and_has_least_energy():
    """Δa k_edit = codes and Δa k_prior = 0 exactly (up to μ); among all updates that do, it has the
    smallest mean change over the covariance's tokens, tr(Δa C Δaᵀ)."""
    gen = torch.Generator().manual_seed(0)
    f, r = 48, 4
    x = torch.randn(500, f, generator=gen) * torch.linspace(0.1, 3.0, f)
    cov = x.t() @ x / len(x)
    k1, kp = torch.randn(f, 2, generator=gen), torch.randn(f, 5, generator=gen)
    codes = torch.randn(r, 2, generator=gen)
    da = solve_a_update(codes, k1, kp, cov, ridge=0.0, mu=1e-10)
    assert torch.allclose(da @ k1, codes, atol=1e-4)
    assert float((da @ kp).abs().max()) < 1e-4
    # any other feasible update differs by something that vanishes on [k1 kp]; it costs more energy
    keys = torch.cat([k1, kp], 1)
    null = torch.eye(f) - keys @ torch.linalg.pinv(keys)
    other = da + torch.randn(r, f, generator=gen) @ null
    assert torch.allclose(other @ keys, da @ keys, atol=1e-4)
    energy = lambda d: float(torch.trace(d @ cov @ d.t()))  # noqa: E731
    assert energy(da) < energy(other)


def test_closed_form_a_keeps_an_earlier_edit_exactly(tiny_wide):
    """The SpliceCore output at a protected earlier edit's positions does not change, so it still holds."""
    model, tok, _, _, preserve = tiny_wide
    state0 = model.splice_state()
    cfg = EditConfig(method="closed_form_a")
    first = counterfactual(model, tok, "import ", rank=1)
    model.load_splice_state(closed_form_a(model, first, [1, 3], EditContext(preserve, []), cfg), strict=False)
    try:
        assert greedy_hits(model, [first]) == [True]
        cores = model.splice_cores()
        before = {L: cores[L].a.detach() @ u for L, u in inputs_at_targets(model, [1, 3], [first]).items()}
        second = counterfactual(model, tok, "return ", rank=1)
        after = closed_form_a(model, second, [1, 3], EditContext(preserve, [], [first]), cfg)
        model.load_splice_state(after, strict=False)
        assert greedy_hits(model, [first, second]) == [True, True]
        for L, u in inputs_at_targets(model, [1, 3], [first]).items():
            assert torch.allclose(cores[L].a.detach() @ u, before[L], atol=1e-3 * float(before[L].abs().max()))
        # and the covariance it protects is the down-projection inputs' second moment
        c = input_covariance(model, [3], preserve[:1])[3]
        assert c.shape == (model.cfg.d_ff, model.cfg.d_ff) and torch.allclose(c, c.t())
    finally:
        model.load_splice_state(state0)


def test_closed_form_a_keeps_the_suite_of_neutral_prompts(tiny_wide):
    """With protect_suite, an earlier edit's neutral prompt keeps its whole greedy continuation when the
    edit writes the last layer (nothing after it mixes positions); without, the same edit changes it."""
    model, tok, _, _, preserve = tiny_wide
    state0 = model.splice_state()
    edit = counterfactual(model, tok, "def __init__(self", rank=1)
    suite = [tok.encode(p) for p in ("def f(self", "def __iter__(self", "class ")]
    before = greedy_continuations(model, suite, 4)
    plain = EditConfig(method="closed_form_a")
    kept = plain.replace(protect_suite=True, neutral_tokens=4)
    try:
        for cfg, same in ((plain, False), (kept, True)):
            model.load_splice_state(state0)
            after = closed_form_a(model, edit, [3], EditContext(preserve, [], suite=suite), cfg)
            model.load_splice_state(after, strict=False)
            assert greedy_hits(model, [edit]) == [True]
            assert (greedy_continuations(model, suite, 4) == before) is same
    finally:
        model.load_splice_state(state0)


def test_context_keys_write_the_edit_at_the_prompt_in_other_contexts(tiny_wide):
    """Variants put the prompt's last line behind other training lines (the same ones wherever the request is
    applied); closed_form_a then writes the same SpliceCore codes at each variant's keys as at the prompt's."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, "import ", rank=1)
    req = EditRequest("x = 1\n" + tok.decode(list(ex.ids[: ex.n_prompt])), tok.decode(list(ex.target)))
    ex = make_example(tok, req.prompt, req.target, model.cfg.max_seq_len)
    variants = context_variants(tok, req, preserve, 3, model.cfg.max_seq_len)
    assert variants == context_variants(tok, req, preserve, 3, model.cfg.max_seq_len)
    assert len(variants) == 3 and context_variants(tok, req, preserve, 0, model.cfg.max_seq_len) == []
    line = req.prompt.rpartition("\n")[2]
    for v in variants:
        assert v.target == ex.target and tok.decode(list(v.ids[: v.n_prompt])).endswith("\n" + line)
    a0 = model.splice_cores()[3].a.detach().clone()
    n = len(ex.target)
    for vs in ([], variants):
        after = closed_form_a(model, ex, [3], EditContext(preserve, [], variants=vs), EditConfig())
        codes = ((after["layers.3.mlp.splice.a"] - a0) @ inputs_at_targets(model, [3], [ex, *variants])[3]).split(n, 1)
        same = [torch.allclose(c, codes[0], atol=1e-3 * float(codes[0].abs().max())) for c in codes[1:]]
        assert same == [bool(vs)] * 3
    assert torch.equal(model.splice_cores()[3].a, a0)


def test_input_covariances_are_recomputed_only_when_a_lower_splicecore_changed(tiny):
    from felix.splice_closed import InputCovariances

    model, _, _, _, preserve = tiny
    state0 = model.splice_state()
    covs = InputCovariances(preserve[:2])
    try:
        first = covs.get(model, [1, 3])
        fresh = input_covariance(model, [1, 3], preserve[:2])
        assert covs.computed == 2 and all(torch.equal(first[L], fresh[L]) for L in (1, 3))
        with torch.no_grad():  # layer 3's own SpliceCore does not feed its inputs, nor layer 1's
            model.splice_cores()[3].a.mul_(2.0)
        assert covs.get(model, [1, 3])[3] is first[3] and covs.computed == 2
        with torch.no_grad():  # layer 1's does feed layer 3's
            model.splice_cores()[1].a.mul_(2.0)
        again = covs.get(model, [1, 3])
        assert covs.computed == 3 and again[1] is first[1] and not torch.equal(again[3], first[3])
        assert torch.equal(again[3], input_covariance(model, [3], preserve[:2])[3])
    finally:
        model.load_splice_state(state0)


def test_covariances_in_chunks_match_one_full_forward(tiny, monkeypatch):
    """Chunked sums over blocks run only up to the last layer give the second moment of the u a full
    forward pass sees, for the inputs themselves and for the SpliceCore keys a u."""
    import felix.splice_closed as sc

    model, _, _, _, preserve = tiny
    captured = {}
    hook = model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: captured.__setitem__(1, args[0].detach().float()))
    try:
        with torch.no_grad():
            model(preserve)
    finally:
        hook.remove()
    u = captured[1].flatten(0, 1)
    a = model.splice_cores()[1].a.detach().float()
    monkeypatch.setattr(sc, "COVARIANCE_CHUNK", 3)  # 8 windows: chunks of 3, 3 and 2
    assert preserve.shape[0] == 8
    got = input_covariance(model, [1], preserve)[1]
    assert torch.allclose(got, u.t() @ u / u.shape[0], rtol=1e-4, atol=1e-6)
    keys = preserved_covariance(model, [1], preserve)[1]
    k = u @ a.t()
    assert torch.allclose(keys, k.t() @ k / k.shape[0], rtol=1e-4, atol=1e-5)


def test_budget_rejects_with_the_reason(tiny):
    model, tok, _, heldout, preserve = tiny
    ex = counterfactual(model, tok)
    ctx = EditContext(preserve, [tok.encode("import ")])
    state0 = model.splice_state()
    ok = propose_edit(model, ex, [3], ctx, heldout,
                      EditConfig("kl_train", steps=40, lr=3e-2, max_ppl_increase=1.0, max_neutral_kl=10.0))
    assert ok.accepted and ok.reason == "within budget" and ok.metrics["success"]
    tight = propose_edit(model, ex, [3], ctx, heldout,
                         EditConfig("kl_train", steps=40, lr=3e-2, max_ppl_increase=-1.0, max_neutral_kl=-1.0))
    assert not tight.accepted
    assert "held-out perplexity" in tight.reason and "neutral KL" in tight.reason
    assert all(torch.equal(v, model.splice_state()[k]) for k, v in state0.items())
    # the reported numbers are the real ones
    model.load_splice_state(ok.after, strict=False)
    try:
        assert heldout_nll(model, heldout) == pytest.approx(ok.metrics["heldout_nll_after"], rel=1e-6)
    finally:
        model.load_splice_state(state0)


def test_total_budget_is_measured_from_the_origin(tiny):
    model, tok, _, heldout, preserve = tiny
    ex = counterfactual(model, tok)
    ctx = EditContext(preserve, [tok.encode("import ")])
    loose = dict(method="kl_train", steps=40, lr=3e-2, max_ppl_increase=1.0, max_neutral_kl=10.0)
    with pytest.raises(FelixError, match="checkpoint before any patch"):
        propose_edit(model, ex, [3], ctx, heldout, EditConfig(**loose, max_total_ppl_increase=0.01))
    nll = heldout_nll(model, heldout)
    ok = propose_edit(model, ex, [3], ctx, heldout, EditConfig(**loose), origin_nll=nll)
    assert ok.accepted and ok.metrics["total_ppl_increase"] == pytest.approx(ok.metrics["ppl_increase"], rel=1e-6)
    # against an origin 10% better than the model now, the same edit breaks a 5% total budget and says so
    tight = propose_edit(model, ex, [3], ctx, heldout, EditConfig(**loose, max_total_ppl_increase=0.05),
                         origin_nll=nll - 0.1)
    assert not tight.accepted and "total budget" in tight.reason and tight.metrics["total_ppl_increase"] > 0.1


def test_make_example_keeps_the_end_of_long_prompts(tiny):
    _, tok, *_ = tiny
    ex = make_example(tok, "x = 1\n" * 40, " y", 64)
    assert len(ex.ids) <= 64 and ex.target == tuple(tok.encode(" y"))


# -- the command line, with the patch stack -------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, dict]:
    from felix.cli import main

    capsys.readouterr()
    rc = main(["splice", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_diagnose_apply_list_rollback(tiny, capsys):
    model, tok, ckpt, *_ = tiny
    ex = counterfactual(model, tok)
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    assert tok.encode(target) == list(ex.target)
    ck = str(ckpt.path)
    rc, d = _cli(capsys, "diagnose", "--checkpoint", ck, "--prompt", prompt, "--target", target)
    assert rc == 0 and len(d["logit_lens"]) == 4 and d["chosen_layers"]
    loose = ["--method", "kl_train", "--steps", "40", "--lr", "0.03", "--max-ppl-increase", "1",
             "--max-neutral-kl", "10", "--layers", "3"]
    rc, out = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, "--neutral", "import ",
                   *loose)
    assert rc == 0 and out["applied"] == 1 and out["results"][0]["metrics"]["success"]
    rc, listed = _cli(capsys, "list", "--checkpoint", ck)
    assert [p["id"] for p in listed["patches"]] == [out["results"][0]["patch_id"]]
    assert listed["patches"][0]["record"]["request"]["target"] == target
    # a restart: a freshly loaded model plus the saved stack holds the edit
    from felix.patches import PatchStack

    fresh, _, _ = load_model(ck)
    PatchStack.open(ckpt.path).restore(fresh)
    assert greedy_hits(fresh, [ex]) == [True]
    # an edit over budget is refused with its reason, and nothing is written
    rc, bad = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", "return ", "--target", target,
                   "--max-ppl-increase", "-1")
    assert rc == 1 and bad["rejected"] == 1 and "perplexity" in bad["results"][0]["reason"]
    assert len(PatchStack.open(ckpt.path).list()) == 1
    # the total budget counts from the checkpoint, so the patch already applied counts against it
    rc, over = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *loose,
                    "--max-total-ppl-increase", "-1")
    assert rc == 1 and "since the checkpoint" in over["results"][0]["reason"]
    assert over["results"][0]["metrics"]["total_ppl_increase"] != over["results"][0]["metrics"]["ppl_increase"]
    assert len(PatchStack.open(ckpt.path).list()) == 1
    rc, rb = _cli(capsys, "rollback", "--checkpoint", ck)
    assert rc == 0 and rb["remaining"] == []
    again, _, _ = load_model(ck)
    PatchStack.open(ckpt.path).restore(again)
    assert all(torch.equal(v, model.splice_state()[k]) for k, v in again.splice_state().items())


@pytest.mark.parametrize("flag, value", [("--margin", "0"), ("--margin", "-1"), ("--neutral-tokens", "0"),
                                         ("--heldout-windows", "0"), ("--preserve-windows", "-4"),
                                         ("--context-keys", "-1")])
def test_cli_rejects_bad_method_values_by_name(tiny, capsys, flag, value):
    from felix.cli import main
    from felix.patches import PatchStack

    _, _, ckpt, *_ = tiny
    before = len(PatchStack.open(ckpt.path).list())
    capsys.readouterr()
    rc = main(["splice", "apply", "--checkpoint", str(ckpt.path), "--prompt", "def ", "--target", " f", flag, value])
    assert rc != 0 and flag in capsys.readouterr().err
    assert len(PatchStack.open(ckpt.path).list()) == before


def test_cli_apply_protect_suite_keeps_earlier_neutral_prompts(tiny_wide, capsys):
    """`apply --protect-suite` reads the stack's neutral prompts (fact edits only) and keeps their
    4-token continuations through a later last-layer edit (without it, the same edit changes them)."""
    from felix.patches import PatchStack
    from felix.splice_data import stack_neutral

    model, tok, ckpt, *_ = tiny_wide
    ck, suite = str(ckpt.path), ["def f(self", "def __iter__(self"]
    loose = ["--method", "closed_form_a", "--layers", "3", "--max-ppl-increase", "1", "--max-neutral-kl", "10"]
    first, second = counterfactual(model, tok, "import ", rank=1), counterfactual(model, tok, rank=1)
    try:
        rc, _ = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", tok.decode(first.ids[: first.n_prompt]),
                     "--target", tok.decode(first.target), *[a for p in suite for a in ("--neutral", p)], *loose)
        assert rc == 0 and stack_neutral(PatchStack.open(ckpt.path)) == suite
        PatchStack.open(ckpt.path).restore(model)
        before = greedy_continuations(model, [tok.encode(p) for p in suite], 4)
        rc, out = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", tok.decode(second.ids[: second.n_prompt]),
                       "--target", tok.decode(second.target), "--protect-suite", "--neutral-tokens", "4", *loose)
        assert rc == 0 and out["results"][0]["metrics"]["success"]
        PatchStack.open(ckpt.path).restore(model)
        assert greedy_continuations(model, [tok.encode(p) for p in suite], 4) == before
    finally:
        while PatchStack.open(ckpt.path).list():
            _cli(capsys, "rollback", "--checkpoint", ck)
        model.load_splice_state(load_model(ckpt.path)[0].splice_state())


def test_cli_bench_and_make_edits(tiny, capsys, tmp_path):
    model, tok, ckpt, *_ = tiny
    reqs = []
    for p in ("def __init__(self", "import "):
        ex = counterfactual(model, tok, p)
        # the first edit's own prompt as a neutral prompt: an edit that holds must break it
        reqs.append(EditRequest(p, tok.decode(ex.target), [" " + p], ["class ", "if ", "def __init__(self"]))
    save_requests(tmp_path / "edits.jsonl", reqs)
    rc, out = _cli(capsys, "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "edits.jsonl"),
                   "--n", "2", "--layers", "3", "--method", "kl_train", "--steps", "40", "--lr", "0.03",
                   "--max-ppl-increase", "1", "--max-neutral-kl", "10", "--out", str(tmp_path / "bench"),
                   "--keep-patches", str(tmp_path / "kept"))
    assert rc == 0
    assert {"success_rate", "paraphrase_rate", "retention_rate", "locality_rate", "ppl_drift"} <= out.keys()
    for key in ("requantized", "requantized_gptq"):
        assert {"retention_rate", "paraphrase_rate", "locality_rate", "ppl_drift"} <= out[key].keys()
    # the drift is the mix's: its sources' log-perplexity changes, weighted as the mix weights them
    config = json.loads((tmp_path / "bench" / "bench.json").read_text())["config"]
    weights = {s: v["weight"] for s, v in config["heldout"].items()}
    assert set(out["ppl_drift_by_source"]) == set(weights) == {"code", "prose"}
    mixed = math.exp(sum(w * math.log1p(out["ppl_drift_by_source"][s]) for s, w in weights.items())) - 1
    assert out["ppl_drift"] == pytest.approx(mixed, rel=1e-6, abs=1e-9)
    from felix.patches import PatchStack

    assert len(PatchStack.open(tmp_path / "kept")) == out["applied"] > 0
    from felix.cli import main

    capsys.readouterr()
    assert main(["splice", "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "edits.jsonl"),
                 "--n", "1", "--keep-patches", str(tmp_path / "kept")]) == 2
    assert "already holds patches" in capsys.readouterr().err
    assert len(out["steps"]) == 2 and out["success_rate"] > 0
    breaks = out["locality_breaks"]
    assert out["locality_rate"] == pytest.approx(1 - len(breaks) / 3)
    assert out["locality_next_token_rate"] >= out["locality_rate"]
    for b in breaks:
        assert b["before"] != b["after"]
        assert b["first_changed"]["edit"] == out["steps"][b["first_changed"]["step"] - 1]["id"]
    if out["retention_rate"] == 1:  # the first edit still holds, so its prompt, a neutral one, has changed
        own = [b for b in breaks if b["prompt"] == "def __init__(self"]
        assert own and own[0]["first_changed"]["step"] == 1 and own[0]["next_token_first_changed"]["step"] == 1
    assert "circuit_distance" in out["steps"][-1] and -1 <= out["circuit_stability"] <= 1
    assert (tmp_path / "bench" / "bench.png").stat().st_size > 0
    assert not (ckpt.path / "splices" / "stack.json").is_file() or not json.loads(
        (ckpt.path / "splices" / "stack.json").read_text())["patches"]  # the bench leaves the checkpoint alone


def test_cli_make_edits_from_facts_needs_a_facts_source(tiny, capsys, tmp_path):
    from felix.cli import main

    ckpt = tiny[2]
    capsys.readouterr()
    assert main(["splice", "make-edits", "--checkpoint", str(ckpt.path), "--out", str(tmp_path / "e.jsonl"),
                 "--n", "5", "--source", "facts"]) == 2
    assert "no 'facts' source" in capsys.readouterr().err and not (tmp_path / "e.jsonl").exists()


class NgramOracle(torch.nn.Module):
    """A "model" that holds every fact of its documents: it predicts the token that followed the last
    six tokens there (the first one seen), so make_edits' fact finding can be checked exactly."""

    def __init__(self, tok, docs: list[str], cfg: ModelConfig):
        super().__init__()
        self.cfg, self.vocab = cfg, cfg.vocab_size
        self.tok_emb = torch.nn.Embedding(1, 1)
        self.table: dict[tuple[int, ...], int] = {}
        for d in docs:
            ids = tok.encode(d)
            for i in range(6, len(ids)):
                self.table.setdefault(tuple(ids[i - 6 : i]), ids[i])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                out[b, t, self.table.get(tuple(row[max(0, t - 5) : t + 1]), 1)] = 1.0
        return out


def test_make_edits_finds_held_facts_and_rewrites_them(tiny):
    from felix.splice_data import corpus_documents, make_edits

    model, tok, ckpt, *_ = tiny
    docs = corpus_documents(ckpt, tok, max_docs=6)
    oracle = NgramOracle(tok, docs, model.cfg.model_copy(update={"max_seq_len": 4096}))
    reqs = make_edits(oracle, tok, docs, 5, n_neutral=3)
    assert len(reqs) == 5 and len({r.prompt for r in reqs}) == 5
    edited = {r.prompt for r in reqs}
    for r in reqs:
        assert r.prompt.split("\n")[-1] in r.paraphrases and len(r.neutral) == 3
        assert not edited & set(r.neutral)  # neutral prompts are facts nobody edits
        # nor one ending in an edited line, indented otherwise (it would be that edit's paraphrase)
        assert not {e.split("\n")[-1].strip() for e in edited} & {n.split("\n")[-1].strip() for n in r.neutral}
        # the original continuation is held, the counterfactual target is not
        assert greedy_hits(oracle, [make_example(tok, r.prompt, r.target, 4096)]) == [False]
        for n in r.neutral:
            assert any(greedy_hits(oracle, [make_example(tok, n, t, 4096)]) for t in _next_words(docs, n))


def _next_words(docs: list[str], prompt: str) -> list[str]:
    import re

    out = []
    for d in docs:
        i = d.find(prompt)
        if i >= 0:
            m = re.match(r" ?[A-Za-z_][A-Za-z0-9_]*", d[i + len(prompt):])
            out += [m.group(0)] if m else []
    return out


def test_requantizer_rounds_splicecore_through_rq4():
    from felix.quant_formats import get_format
    from felix.splice_quant import requantizer

    torch.manual_seed(0)
    m = FelixLM(ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=16,
                            splice_every=1, splice_rank=8))
    for core in m.splice_cores().values():
        torch.nn.init.normal_(core.b, std=0.1)
    s0 = m.splice_state()
    requantizer()(m)
    fq = get_format("rq4").fake_quant
    # felix quantize's rule: a (8 x 128) fills RQ4 blocks, b (64 x 8 = 512 < 1024 elements) is kept in fp16
    for k, v in m.splice_state().items():
        kind = k.rsplit(".", 1)[1]
        want = s0[k] if kind == "gate" else fq(s0[k]) if kind == "a" else s0[k].half().float()
        assert torch.equal(v, want), k


def test_gptq_requantizer_keeps_an_edit_closer_than_plain_rounding(tiny_wide):
    """On the grid (plain re-quantization leaves it alone), gates exact, and the SpliceCore output at the
    edit's own positions nearer the fp32 one than plain rounding gets it."""
    from felix.splice_quant import gptq_requantizer, requantizer

    model, tok, _, _, preserve = tiny_wide
    state0 = model.splice_state()
    ex = counterfactual(model, tok, "import ", rank=1)
    model.load_splice_state(closed_form_a(model, ex, [1, 3], EditContext(preserve, []),
                                          EditConfig(method="closed_form_a")), strict=False)
    spliced = model.splice_state()

    def outputs():  # g B a u at the edit's target positions, per layer
        cores = model.splice_cores()
        return {L: cores[L].gate * cores[L].b.detach() @ (cores[L].a.detach() @ u)
                for L, u in inputs_at_targets(model, [1, 3], [ex]).items()}

    try:
        want = outputs()
        requantizer()(model)
        plain = outputs()
        model.load_splice_state(spliced)
        gptq_requantizer(preserve, [ex], edit_share=0.5)(model)
        rounded = model.splice_state()
        got = outputs()
        requantizer()(model)
        assert all(torch.equal(v, rounded[k]) for k, v in model.splice_state().items())
        assert all(torch.equal(rounded[k], spliced[k]) for k in spliced if k.endswith("gate"))
        err = {name: sum(float((o[L] - want[L]).norm()) for L in want) for name, o in [("plain", plain), ("gptq", got)]}
        assert err["gptq"] < err["plain"], err
    finally:
        model.load_splice_state(state0)


def test_next_token_shares_count_bigrams():
    from felix.splice_data import NextTokenShares

    s = NextTokenShares([np.array([1, 2, 1, 2, 1, 3]), np.array([1, 2])], vocab_size=8)
    # token 1 is followed by 2 three times and by 3 once; 7 never occurs
    assert s.share(1, 2) == 0.75 and s.share(1, 3) == 0.25 and s.share(1, 1) == 0.0
    assert s.share(2, 1) == 1.0 and s.share(7, 1) == 0.0
    capped = NextTokenShares([np.array([1, 2, 1, 3])], vocab_size=8, max_tokens=2)
    assert capped.share(1, 2) == 1.0 and capped.share(1, 3) == 0.0
    pairs = NextTokenShares([np.array([1, 2, 1, 2, 1, 3]), np.array([1, 2])], vocab_size=8, context=2)
    assert pairs.share([1, 2], 1) == 1.0 and pairs.share([5, 2, 1], 2) == 0.5 and pairs.share([2, 1], 3) == 0.5
    assert pairs.context_count([2, 1]) == 2 and pairs.share([3], 1) == 0.0 and pairs.share([7, 7], 1) == 0.0


def test_make_edits_leaves_out_habits(tiny):
    from felix.splice_data import NextTokenShares, corpus_documents, make_edits

    model, tok, ckpt, *_ = tiny
    docs = corpus_documents(ckpt, tok, max_docs=6)
    oracle = NgramOracle(tok, docs, model.cfg.model_copy(update={"max_seq_len": 4096}))
    shares = NextTokenShares([np.array(tok.encode(d)) for d in docs], model.cfg.vocab_size)
    reqs = make_edits(oracle, tok, docs, 5, n_neutral=3, shares=shares, max_habit=0.1, lines_per_doc=48)
    assert len(reqs) == 5
    for text in [r.prompt for r in reqs] + [n for r in reqs for n in r.neutral]:
        ids = tok.encode(text)
        held = [w for w in _next_words(docs, text) if greedy_hits(oracle, [make_example(tok, text, w, 4096)])[0]]
        assert held and all(shares.share(ids[-1], tok.encode(w)[0]) < 0.1 for w in held)
    # and the filter is what kept them out: without it, some fact's target is a habit
    every = make_edits(oracle, tok, docs, 5, n_neutral=3, lines_per_doc=48)
    habits = [shares.share(tok.encode(r.prompt)[-1], tok.encode(w)[0]) for r in every
              for w in _next_words(docs, r.prompt)]
    assert max(habits) >= 0.1
