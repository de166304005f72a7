"""Splice edits on a tiny trained model: request format, measurements, both methods, the budget,
diagnosis, and the bench metrics' definitions."""

from __future__ import annotations

import json

import pytest
import torch
from splice_helpers import counterfactual  # noqa: E402

from felix.config import ModelConfig
from felix.errors import FelixError
from felix.generate import generate
from felix.heldout import heldout_nll
from felix.model import FelixLM
from felix.splice_bench import jaccard, spearman
from felix.splice_closed import _keys, _null_projector, closed_form, closed_form_a, solve_a_update
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import input_covariance, inputs_at_targets, preserved_covariance
from felix.splice_data import context_variants
from felix.splice_diagnose import attributions, cci, diagnose, logit_lens
from felix.splice_edit import EditRequest, load_requests, propose_edit, save_requests
from felix.splice_examples import (
    Example,
    grads_only_for,
    greedy_continuations,
    greedy_hits,
    make_example,
    splice_names,
)
from felix.splice_kl import kl_train


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


def test_greedy_continuations_match_one_at_a_time_decoding():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=32, splice_every=1)
    model = FelixLM(cfg).eval()
    # ragged lengths across chunk edges, and prompts that max_seq_len cuts short (29 + 3 > 32, 31 + 1 = 32)
    prompts = [[(5 * i + 3 * j) % 61 for j in range(n)] for i, n in enumerate([1, 4, 9, 2, 29, 31, 6])]
    want = [tuple(generate(model, p, 4, greedy=True)) for p in prompts]
    assert [len(c) for c in want] == [4, 4, 4, 4, 3, 1, 4]
    assert greedy_continuations(model, prompts, 4, chunk=3) == want
    assert greedy_continuations(model, prompts, 4) == want
    assert greedy_continuations(model, prompts, 0) == [()] * len(prompts)
    with pytest.raises(ValueError, match="32 tokens has no room"):
        greedy_continuations(model, [list(range(32))], 2)


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
    """The update leaves a protected earlier edit's keys alone (Δa u = 0), so it still holds. The keys of the
    upper layer can themselves move, through the earlier positions the lower layer's write reaches: only the
    lowest layer's output there is unchanged outright."""
    model, tok, _, _, preserve = tiny_wide
    state0 = model.splice_state()
    cfg = EditConfig(method="closed_form_a")
    first = counterfactual(model, tok, "import ", rank=1)
    model.load_splice_state(closed_form_a(model, first, [1, 3], EditContext(preserve, []), cfg), strict=False)
    try:
        assert greedy_hits(model, [first]) == [True]
        cores = model.splice_cores()
        before = {L: cores[L].a.detach() @ u for L, u in inputs_at_targets(model, [1, 3], [first]).items()}
        a_before = {L: cores[L].a.detach().clone() for L in (1, 3)}
        second = counterfactual(model, tok, "return ", rank=1)
        after = closed_form_a(model, second, [1, 3], EditContext(preserve, [], [first]), cfg)
        model.load_splice_state(after, strict=False)
        assert greedy_hits(model, [first, second]) == [True, True]
        for L, u in inputs_at_targets(model, [1, 3], [first]).items():
            scale = 1e-3 * float(before[L].abs().max())
            assert torch.allclose(cores[L].a.detach() @ u, a_before[L] @ u, atol=scale)
        assert torch.allclose(cores[1].a.detach() @ inputs_at_targets(model, [1], [first])[1], before[1],
                              atol=1e-3 * float(before[1].abs().max()))
        # and the covariance it protects is the down-projection inputs' second moment
        c = input_covariance(model, [3], preserve[:1])[3]
        assert c.shape == (model.cfg.d_ff, model.cfg.d_ff) and torch.allclose(c, c.t())
    finally:
        model.load_splice_state(state0)


def test_closed_form_a_gives_the_same_patch_every_time(tiny_wide):
    """One request, one patch, bit for bit (LAPACK's default least-squares driver varied in the last bit)."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, "import ", rank=1)
    first, *rest = (closed_form_a(model, ex, [3], EditContext(preserve, []), EditConfig()) for _ in range(6))
    for again in rest:
        assert all(torch.equal(again[k], v) for k, v in first.items())


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
    from felix.splice_covariance import InputCovariances

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
    import felix.splice_covariance as sc

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


def test_grads_only_for_leaves_the_callers_gradients_as_they_were():
    """Before: it set every parameter's .grad to None on exit, dropping gradients a caller had accumulated."""
    torch.manual_seed(0)
    model = FelixLM(ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=2, d_ff=32, max_seq_len=8,
                                splice_every=1, splice_rank=2))
    held = model.tok_emb.weight
    held.grad = torch.ones_like(held)
    core = model.splice_cores()[0]
    with grads_only_for(model, [core.b]):
        assert held.grad is None  # inside, backward writes the edited tensors' gradients alone
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        assert core.b.grad is not None and held.grad is None
    assert torch.equal(held.grad, torch.ones_like(held)) and core.b.grad is None
