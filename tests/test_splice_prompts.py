"""Preservation prompts (EXP-46ah): their last-token inputs join the preservation text's in closed_form_a's
C, so an edit writes less into prompts of their kind; the file format and the facts' prompt set."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from splice_helpers import cli_json, counterfactual

from felix.errors import FelixError
from felix.facts import TEMPLATES, Fact, stdlib_facts
from felix.patches import PatchStack
from felix.splice_closed import closed_form_a
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import (
    InputCovariances,
    input_covariance,
    inputs_at_targets,
    prompt_moment,
    with_prompt_moment,
)
from felix.splice_data import load_prompts, save_prompts
from felix.splice_edit import EditRequest, save_requests
from felix.splice_examples import Example, greedy_continuations, greedy_hits, last_position_examples
from felix.splice_facts import preservation_path, preservation_prompts
from felix.splice_next_tokens import NextTokenCheck

# prompts of the edit's own kind (an import after an import), so their keys are close to its key
KIND = [f"import {n}\nimport " for n in sorted(sys.stdlib_module_names) if not n.startswith("_") and n != "os"][:120]


def test_prompt_moment_is_the_second_moment_of_last_token_inputs(tiny_wide):
    model, tok, *_ = tiny_wide
    prompts = [tok.encode(p) for p in KIND]
    u = inputs_at_targets(model, [1, 3], last_position_examples(prompts))
    moment = prompt_moment(model, [1, 3], prompts)
    for L in (1, 3):
        assert torch.allclose(moment[L], u[L] @ u[L].t() / len(prompts), rtol=1e-5, atol=1e-6)
    c = torch.eye(3) * 2.0
    n = torch.diag(torch.tensor([1.0, 0.0, 0.0]))
    blended = with_prompt_moment(c, n, 0.5)
    assert float(blended.trace()) == pytest.approx(1.5 * float(c.trace()))  # the prompts weigh w · tr C
    assert torch.equal(blended - c, 3.0 * n)


def test_covariances_with_prompts_blend_them_and_refuse_a_negative_weight(tiny_wide):
    model, tok, _, _, preserve = tiny_wide
    prompts = [tok.encode(p) for p in KIND]
    got = InputCovariances(preserve, prompts, 2.0).get(model, [3])[3]
    want = with_prompt_moment(input_covariance(model, [3], preserve)[3], prompt_moment(model, [3], prompts)[3], 2.0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(InputCovariances(preserve, prompts, 0.0).get(model, [3])[3],
                       input_covariance(model, [3], preserve)[3])  # weight 0: the text alone
    with pytest.raises(ValueError, match="prompt_weight"):
        InputCovariances(preserve, prompts, -1.0)


def test_an_edit_writes_less_into_prompts_of_the_preserved_kind(tiny_wide):
    """With half of KIND preserved, the other half (never given) gets a smaller share of the edit's write, the
    smaller the more the preserved half weighs, while the edit still holds: the write is exact at its own key
    whatever C is. How much smaller depends on the tiny model: shares 1.02, 0.76, 0.65 at weights 0, 1, 4 for
    one trained before shards were split by content, 0.79, 0.72, 0.66 for today's."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, "import os\nimport ", rank=1)
    kind = [tok.encode(p) for p in KIND]
    shown, unseen = kind[::2], kind[1::2]
    key = inputs_at_targets(model, [3], [ex])[3]
    unseen_u = inputs_at_targets(model, [3], last_position_examples(unseen))[3]
    a0 = model.splice_cores()[3].a.detach().clone()
    share = {}
    for weight in (0.0, 1.0, 4.0):
        ctx = EditContext(preserve, [], covariances=InputCovariances(preserve, shown, weight))
        after = closed_form_a(model, ex, [3], ctx, EditConfig())
        da = after["layers.3.mlp.splice.a"] - a0
        share[weight] = float((da @ unseen_u).norm(dim=0).mean() / (da @ key).norm())
        state = model.splice_state()
        model.load_splice_state(after, strict=False)
        try:
            assert greedy_hits(model, [ex]) == [True]
        finally:
            model.load_splice_state(state)
    assert share[4.0] < share[1.0] < share[0.0] and share[4.0] < 0.85 * share[0.0]


def test_prompt_tokens_cover_the_positions_of_each_prompts_greedy_answer(tiny_wide):
    model, tok, _, _, preserve = tiny_wide
    prompts = [tok.encode(p) for p in KIND[:40]]
    conts = greedy_continuations(model, prompts, 3)
    moment = prompt_moment(model, [3], prompts, conts)[3]
    u = inputs_at_targets(model, [3], [Example((*p, *c), len(p)) for p, c in zip(prompts, conts, strict=True)])[3]
    assert u.shape[1] == 3 * len(prompts)
    first, rest = u.reshape(-1, len(prompts), 3)[:, :, 0], u.reshape(-1, len(prompts), 3)[:, :, 1:].flatten(1)
    # the next token weighs as much as the two after it together
    want = (first @ first.t() / len(prompts) + rest @ rest.t() / (2 * len(prompts))) / 2
    assert torch.allclose(moment, want, rtol=1e-5, atol=1e-6)
    # one token of answer is the prompt's last position alone
    assert torch.allclose(prompt_moment(model, [3], prompts, [c[:1] for c in conts])[3],
                          prompt_moment(model, [3], prompts)[3], rtol=1e-5, atol=1e-6)
    # the answers are generated once, by the model as it is at the first get; an edit at layer 3 leaves them
    # and layer 1's entry alone
    covs = InputCovariances(preserve, prompts, 1.0, prompt_tokens=3)
    covs.get(model, [1, 3])
    assert covs.continuations == conts and covs.computed == 2
    state = model.splice_state()
    try:
        model.load_splice_state({"layers.3.mlp.splice.a": state["layers.3.mlp.splice.a"] * 2}, strict=False)
        covs.get(model, [1, 3])
        assert covs.continuations == conts and covs.computed == 2  # layer 3's u is read below its own core
        model.load_splice_state({"layers.1.mlp.splice.a": state["layers.1.mlp.splice.a"] * 2}, strict=False)
        covs.get(model, [1, 3])
        assert covs.continuations == conts and covs.computed == 3  # layer 3 recomputed, on the same answers
    finally:
        model.load_splice_state(state)
    with pytest.raises(ValueError, match="prompt_tokens"):
        InputCovariances(preserve, prompts, 1.0, prompt_tokens=0)


def test_preservation_prompts_file_round_trips_and_bad_input_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    prompts = ["HTTP status 404 means", "línea\ncon salto", "&amp; is"]
    save_prompts(path, prompts)
    assert load_prompts(path) == prompts
    for text, where in (('{"prompt": "a"}\nnot json\n', ":2: invalid JSON"),
                        ('{"prompt": "a", "target": "b"}\n', ":1: expected an object"),
                        ('{"prompt": ""}\n', ":1: expected an object"),
                        ('["a"]\n', ":1: expected a JSON object, got an array"),
                        ("\n\n", "no preservation prompts")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(FelixError, match=where):
            load_prompts(path)
    with pytest.raises(FelixError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def test_facts_preservation_prompts_leave_out_every_fact_a_request_names():
    facts = stdlib_facts()
    edited, neutral, other = facts[0], facts[1], facts[2]
    prompt = Fact(edited.relation, edited.subject, "x").prompt(TEMPLATES[edited.relation][0])[0]
    req = EditRequest(prompt, " x", [], [neutral.prompt(TEMPLATES[neutral.relation][-1])[0]])
    out = preservation_prompts(facts, [req])
    for f in (edited, neutral):  # none of their templates' prompts, not only the one named
        assert not {f.prompt(t)[0] for t in TEMPLATES[f.relation]} & set(out)
    assert {other.prompt(t)[0] for t in TEMPLATES[other.relation]} <= set(out)
    assert len(out) == sum(len(TEMPLATES[f.relation]) for f in facts) - 2 * len(TEMPLATES[edited.relation])


def test_cli_bench_leaves_its_own_prompts_out_of_the_preservation_prompts(tiny_wide, capsys, tmp_path):
    model, tok, ckpt, *_ = tiny_wide
    ex = counterfactual(model, tok, "import ", rank=1)
    save_requests(tmp_path / "e.jsonl", [EditRequest("import ", tok.decode(list(ex.target)), [], ["class "])])
    save_prompts(tmp_path / "p.jsonl", [*KIND[:8], "class "])  # "class " is the bench's own neutral prompt
    rc, out = cli_json(capsys, "splice", "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "e.jsonl"),
                       "--n", "1", "--layers", "3", "--preserve-prompts", str(tmp_path / "p.jsonl"),
                       "--out", str(tmp_path / "b"), "--max-ppl-increase", "1", "--max-neutral-kl", "10",
                       "--keep-patches", str(tmp_path / "stack"))
    config = json.loads((tmp_path / "b" / "bench.json").read_text())["config"]
    assert rc == 0 and out["applied"] == 1
    assert config["preserve_prompts"] == 8 and config["prompt_weight"] == EditConfig().prompt_weight
    # the patch says what it was made with: every setting, and which prompts (file, digest, how many used)
    record = PatchStack.open(tmp_path / "stack").list()[0].record
    assert EditConfig(**record["config"]) == EditConfig().replace(layers=[3], max_ppl_increase=1.0,
                                                                  max_neutral_kl=10.0)
    assert record["inputs"]["preserve_prompts"] == {
        "file": str(tmp_path / "p.jsonl"), "used": 8,
        "sha256": hashlib.sha256((tmp_path / "p.jsonl").read_bytes()).hexdigest()}
    from felix.cli import main

    given = ["--preserve-prompts", str(tmp_path / "p.jsonl")]
    for bad, flag in ((["--prompt-weight", "0", *given], "--prompt-weight"),
                      (["--prompt-tokens", "0", *given], "--prompt-tokens"),
                      (["--prompt-weight", "2"], "--preserve-prompts"),
                      (["--prompt-tokens", "2"], "--preserve-prompts")):
        assert main(["splice", "apply", "--checkpoint", str(ckpt.path), "--prompt", "import ", "--target", " x",
                     *bad]) != 0
        assert flag in capsys.readouterr().err


def test_facts_preservation_prompts_go_beside_the_edits_by_default(tmp_path):
    assert preservation_path(tmp_path / "facts-s0.jsonl") == tmp_path / "facts-s0.preserve.jsonl"
    assert preservation_path("edits") == preservation_path("edits.jsonl")


def test_prompt_repair_keeps_the_next_token_of_every_preservation_prompt_the_write_changed(tiny_wide):
    """A write that changes some preservation prompts' next tokens is solved again with their keys kept
    exactly: on one layer those prompts' outputs there are then unchanged, and the edit still holds."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, "import os\nimport ", rank=1)
    kind = [tok.encode(p) for p in KIND]
    before = greedy_continuations(model, kind, 1)

    def edited(cfg: EditConfig) -> list[tuple[int, ...]]:
        after = closed_form_a(model, ex, [3], EditContext(preserve, [], preserve_prompts=kind), cfg)
        state = model.splice_state()
        model.load_splice_state(after, strict=False)
        try:
            assert greedy_hits(model, [ex]) == [True]
            return greedy_continuations(model, kind, 1)
        finally:
            model.load_splice_state(state)

    plain = edited(EditConfig())
    flipped = {i for i, (a, b) in enumerate(zip(before, plain, strict=True)) if a != b}
    assert flipped, "the unrepaired write changes no preservation prompt: nothing to repair"
    repaired = edited(EditConfig(prompt_repair=1))
    assert all(repaired[i] == before[i] for i in flipped)


def test_repair_drop_also_keeps_the_prompts_a_write_took_that_much_lead_from(tiny_wide):
    """With `prompt_repair_drop`, a prompt whose next token stayed but lost at least that many nats of lead is
    kept too: on one layer, once the repair settles, no listed prompt has lost that much."""
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, "import os\nimport ", rank=1)
    # a few of the edit's kind (it changes all of them) and other kinds it only weakens
    names = [n for n in sorted(sys.stdlib_module_names) if not n.startswith("_")]
    listed = [tok.encode(p) for p in KIND[:12] + [f"from {n} import " for n in names[:40]]
              + [f"{n}." for n in names[40:80]]]
    check = NextTokenCheck(model, listed, 0)
    tokens0, lead0 = check.read()
    ctx = EditContext(preserve, [], preserve_prompts=listed)
    state = model.splice_state()

    def lost(drop: float | None) -> torch.Tensor:
        """Each listed prompt's lead lost to the repaired write; its next token must not have changed."""
        after = closed_form_a(model, ex, [3], ctx, EditConfig(prompt_repair=8, prompt_repair_drop=drop))
        model.load_splice_state(after, strict=False)
        try:
            assert greedy_hits(model, [ex]) == [True]
            tokens, lead = check.read(tokens0)
            assert tokens == tokens0  # the repair settled: no next token changed
            return lead0 - lead
        finally:
            model.load_splice_state(state)

    drop = 0.75 * float(lost(None).max())  # so the plain repair leaves a prompt that lost more than `drop`
    assert drop > 0.01, "the plain repair took no lead from any prompt: nothing to test"
    assert float(lost(drop).max()) < drop


def test_cli_bench_reports_the_preservation_prompts_kept_and_repair_keeps_them(tiny_wide, capsys, tmp_path):
    model, tok, ckpt, *_ = tiny_wide
    ex = counterfactual(model, tok, "import os\nimport ", rank=1)
    save_requests(tmp_path / "e.jsonl", [EditRequest("import os\nimport ", tok.decode(list(ex.target)), [], [])])
    save_prompts(tmp_path / "p.jsonl", KIND)
    kept = {}
    for repair in ("0", "6"):
        rc, out = cli_json(capsys, "splice", "bench", "--checkpoint", str(ckpt.path), "--edits",
                           str(tmp_path / "e.jsonl"), "--n", "1", "--layers", "3", "--preserve-prompts",
                           str(tmp_path / "p.jsonl"), "--prompt-repair", repair,
                           "--out", str(tmp_path / f"b{repair}"), "--max-ppl-increase", "10", "--max-neutral-kl", "10")
        assert rc == 0 and out["applied"] == 1, out["rejections"]
        kept[repair] = out["preserve_prompts_kept"]
    assert kept["0"] < 1.0, "the unrepaired edit changes no preservation prompt: nothing to repair"
    assert kept["6"] == 1.0
