"""Text pins (felix.splice_pins): the search ranks training-text positions by the share of an edit's
write they would get, closed_form_a keeps the pinned ones, and an edit they push over its budget is
retried without them."""

from __future__ import annotations

import pytest
import torch
from splice_helpers import cli_json, counterfactual

from felix.splice_closed import closed_form_a
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import down_inputs, input_covariance, inputs_at_targets
from felix.splice_data import corpus_windows
from felix.splice_edit import propose_edit
from felix.splice_examples import greedy_hits
from felix.splice_pins import PIN_CONTEXT_LINES, TextPins, last_line

RIDGE = EditConfig().a_ridge


def _pins(tiny_wide, withheld=(), context_lines=PIN_CONTEXT_LINES) -> TextPins:
    _, tok, ckpt, *_ = tiny_wide
    return TextPins(corpus_windows(ckpt, "train", 8, 32, seed=7), tok, withheld, context_lines)


def _exact_shares(model, pins: TextPins, layer: int, key: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """ρ of every searched position from fp32 inputs, written out from its definition."""
    f = cov.shape[0]
    c = cov.double() + RIDGE * float(cov.trace()) / f * torch.eye(f, dtype=torch.float64)
    u = down_inputs(model, [layer], pins.windows)[layer].flatten(0, 1).double()
    cinv_k = torch.linalg.solve(c, key.double())
    return (u @ cinv_k / (key.double() @ cinv_k)).float()


def _edit_at_layer3(tiny_wide):
    model, tok, _, _, preserve = tiny_wide
    ex = counterfactual(model, tok, "import ", rank=1)
    return ex, inputs_at_targets(model, [3], [ex])[3][:, 0], input_covariance(model, [3], preserve)[3]


def test_pins_are_the_positions_on_new_lines_the_write_reaches_most(tiny_wide):
    model = tiny_wide[0]
    pins = _pins(tiny_wide)
    _, key, cov = _edit_at_layer3(tiny_wide)
    where = pins.positions(model, 3, key, cov, RIDGE, 4)
    rho = _exact_shares(model, pins, 3, key, cov)
    lines = [pins.line_at(s) for s in where]
    assert len(where) == 4 and len(set(lines)) == 4 and all(lines)
    assert all("\n" in pins._text_to(s) for s in where)  # whole lines: none cut by its window's start
    # no position on another non-empty line gets a larger share (up to the bfloat16 ranking's error)
    floor = float(rho[where].min())
    tol = 0.02 * float(rho.abs().max())
    others = [s for s in range(len(rho)) if pins.line_at(s) not in {*lines, ""} and "\n" in pins._text_to(s)]
    assert max(float(rho[s]) for s in others) <= floor + tol
    # the top pin's line, given as the edit's own text or withheld, is never pinned
    top = lines[int(rho[where].argmax())]
    for excluded, search in (([f"x\n  {top}"], pins), ((), _pins(tiny_wide, withheld=[top]))):
        again = search.positions(model, 3, key, cov, RIDGE, 4, exclude=excluded)
        assert len(again) == 4 and top not in {search.line_at(s) for s in again}


def test_a_pin_is_kept_at_its_input_as_a_prompt_or_in_its_window(tiny_wide):
    model, tok, *_ = tiny_wide
    _, key, cov = _edit_at_layer3(tiny_wide)
    u = down_inputs(model, [3], _pins(tiny_wide).windows)[3].flatten(0, 1)
    for lines in (PIN_CONTEXT_LINES, 0, None):
        pins = _pins(tiny_wide, context_lines=lines)
        where = pins.positions(model, 3, key, cov, RIDGE, 4)
        got = pins.select(model, 3, key, cov, RIDGE, 4)
        assert got.shape == (model.cfg.d_ff, 4)
        for j, s in enumerate(where):
            if lines is None:  # the position's own input in its window
                want = u[s]
            else:  # the last position of the text behind it, cut to its line and `lines` lines before
                prompt = pins.prompt_at(s)
                text = tok.decode(prompt)
                assert text.count("\n") <= lines and last_line(text) == pins.line_at(s)
                want = down_inputs(model, [3], torch.tensor([prompt]))[3][0, -1]
            assert torch.allclose(got[:, j], want, atol=1e-5 * float(want.abs().max()))
    # a pin read as its bare line is another input than the same line inside its window
    bare = _pins(tiny_wide, context_lines=0)
    where = bare.positions(model, 3, key, cov, RIDGE, 4)
    assert not torch.allclose(bare.select(model, 3, key, cov, RIDGE, 4), u[where].t(), atol=1e-3)


def test_pin_inputs_are_recomputed_only_when_a_lower_splicecore_changed(tiny_wide):
    model, *_ = tiny_wide
    pins = _pins(tiny_wide)
    state0 = model.splice_state()
    try:
        first = pins.inputs(model, 3)
        assert pins.computed == 1 and first.shape == (pins.windows.numel(), model.cfg.d_ff)
        with torch.no_grad():
            model.splice_cores()[3].a.mul_(2.0)  # layer 3's own SpliceCore does not feed its inputs
        assert pins.inputs(model, 3) is first and pins.computed == 1
        with torch.no_grad():
            model.splice_cores()[1].a.mul_(2.0)
        assert not torch.equal(pins.inputs(model, 3), first) and pins.computed == 2
    finally:
        model.load_splice_state(state0)


def test_closed_form_a_leaves_its_pins_unchanged(tiny_wide):
    """The pinned positions' SpliceCore codes stay as they were (without pins the same edit moves them),
    and the edit still holds."""
    model, tok, _, _, preserve = tiny_wide
    pins = _pins(tiny_wide)
    ex = counterfactual(model, tok, "import ", rank=1)
    a0 = model.splice_cores()[3].a.detach().clone()
    key = inputs_at_targets(model, [3], [ex])[3][:, 0]
    pinned = pins.select(model, 3, key, input_covariance(model, [3], preserve)[3], RIDGE, 4)
    moved = {}
    for n in (0, 4):
        after = closed_form_a(model, ex, [3], EditContext(preserve, [], pins=pins), EditConfig(text_pins=n))
        da = after["layers.3.mlp.splice.a"] - a0
        moved[n] = float((da @ pinned).norm() / (da @ key).norm())
        state = model.splice_state()
        model.load_splice_state(after, strict=False)
        try:
            assert greedy_hits(model, [ex]) == [True]
        finally:
            model.load_splice_state(state)
    assert moved[4] < 1e-3 < moved[0]
    with pytest.raises(ValueError, match="pin search"):
        closed_form_a(model, ex, [3], EditContext(preserve, []), EditConfig(text_pins=2))


def test_an_edit_its_pins_push_over_the_budget_is_retried_without_them(tiny_wide):
    model, tok, ckpt, heldout, preserve = tiny_wide
    pins = TextPins(corpus_windows(ckpt, "train", 32, 32, seed=7), tok)  # where 4 pins make this edit dearer
    ex = counterfactual(model, tok, "import ", rank=1)
    ctx = EditContext(preserve, [], pins=pins)
    loose = EditConfig(layers=[3], max_ppl_increase=1.0, max_neutral_kl=10.0)
    cost = {n: propose_edit(model, ex, [3], ctx, heldout, loose.replace(text_pins=n)).metrics["ppl_increase"]
            for n in (0, 4)}
    assert cost[4] > cost[0], "the tiny model's pins should make this edit dearer"
    budget = loose.replace(text_pins=4, max_ppl_increase=(cost[0] + cost[4]) / 2)
    out = propose_edit(model, ex, [3], ctx, heldout, budget)
    assert out.accepted and out.metrics["text_pins"] == 0
    assert "held-out perplexity" in out.metrics["pinned_refusal"]
    assert out.metrics["ppl_increase"] == pytest.approx(cost[0], rel=1e-6)
    kept = propose_edit(model, ex, [3], ctx, heldout, loose.replace(text_pins=4))
    assert kept.accepted and kept.metrics["text_pins"] == 4 and "pinned_refusal" not in kept.metrics


def test_cli_bench_with_text_pins_reports_them(tiny_wide, capsys, tmp_path):
    from felix.splice_edit import EditRequest, save_requests

    model, tok, ckpt, *_ = tiny_wide
    ex = counterfactual(model, tok, "import ", rank=1)
    save_requests(tmp_path / "e.jsonl", [EditRequest("import ", tok.decode(list(ex.target)), [], ["class "])])
    rc, out = cli_json(capsys, "splice", "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "e.jsonl"),
                       "--n", "1", "--layers", "3", "--text-pins", "4", "--pin-windows", "4",
                       "--max-ppl-increase", "1", "--max-neutral-kl", "10")
    assert rc == 0 and out["applied"] == 1 and out["applied_with_pins"] == 1 and out["steps"][0]["text_pins"] == 4
    from felix.cli import main

    assert main(["splice", "apply", "--checkpoint", str(ckpt.path), "--prompt", "import ", "--target", " x",
                 "--text-pins", "-1"]) != 0
    assert "--text-pins" in capsys.readouterr().err
