"""QUAIL: whitelist resolution through the tokenizer, the hinge's value and gradient, margin calibration."""

from __future__ import annotations

import pytest
import torch

from felix.errors import FelixError
from felix.quail import (
    QUANTILE_MAX,
    logit_margin,
    margin_from_noise,
    margin_hinge,
    margin_shift,
    quail_hinge,
    resolve_whitelist,
    unprotected_variants,
)


def test_whitelist_resolves_single_tokens_and_names_the_bad_ones(tiny_mix):
    tok = tiny_mix.tokenizer
    single = tok.decode([tok.encode("def")[0]])
    wl = resolve_whitelist(tok, ["<|end|>", single])
    assert wl.ids == (tok.token_id("<|end|>"), tok.encode(single)[0])
    with pytest.raises(FelixError, match=r"quail.tokens: ' I cannot comply' is \d+ tokens .*not one"):
        resolve_whitelist(tok, ["<|end|>", " I cannot comply"])
    with pytest.raises(FelixError, match="empty"):
        resolve_whitelist(tok, [])
    other = next(i for i in range(20, 400) if i not in wl.ids)
    targets = torch.tensor([[tok.token_id("<|end|>"), other, wl.ids[1]]])
    assert wl.mask(targets).tolist() == [[True, False, True]]


def test_margin_is_target_minus_best_other():
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, 1.0, 3.0]])
    assert logit_margin(logits, torch.tensor([1, 0])).tolist() == [3.0, -3.0]


def test_hinge_value_and_gradient():
    logits = torch.tensor([[[2.0, 5.0, 1.0], [0.0, 1.0, 3.0], [4.0, 0.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[1, 0, 2]])
    mask = torch.tensor([[True, True, False]])
    loss, n = quail_hinge(logits, targets, mask, margin=4.0, gamma=0.5)
    # position 0: margin 3 -> hinge 1; position 1: margin -3 -> hinge 7; mean 4, times gamma
    assert n == 2 and loss.item() == pytest.approx(2.0)
    loss.backward()
    g = logits.grad[0]
    # d/dz: -gamma/n on the target, +gamma/n on the strongest competitor; nothing elsewhere
    assert g[0].tolist() == pytest.approx([0.25, -0.25, 0.0])
    assert g[1].tolist() == pytest.approx([-0.25, 0.0, 0.25])
    assert g[2].abs().sum() == 0


def test_hinge_is_zero_once_the_margin_is_met():
    logits = torch.tensor([[[10.0, 0.0]]], requires_grad=True)
    loss, n = quail_hinge(logits, torch.tensor([[0]]), torch.tensor([[True]]), margin=5.0, gamma=1.0)
    assert loss.item() == 0.0 and n == 1
    loss.backward()
    assert logits.grad.abs().sum() == 0


def test_no_whitelisted_positions_gives_zero():
    loss, n = quail_hinge(torch.randn(1, 4, 7), torch.zeros(1, 4, dtype=torch.long),
                          torch.zeros(1, 4, dtype=torch.bool), 1.0, 1.0)
    assert n == 0 and loss.item() == 0.0


def test_margin_from_noise_is_twice_the_percentile():
    noise = torch.arange(1, 101, dtype=torch.float32) / 100
    assert margin_from_noise(noise, 50.0) == pytest.approx(2 * 0.505)
    with pytest.raises(FelixError, match="no whitelisted positions"):
        margin_from_noise(torch.empty(0), 99.0)


def test_normalizing_by_all_positions_and_protect_only():
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    targets = torch.tensor([1, 0])  # leads 3 and -3
    # Over all 10 target positions of a batch: (1 + 7) / 10.
    assert margin_hinge(logits, targets, 4.0, 1.0, denominator=10).item() == pytest.approx(0.8)
    # protect_only keeps the position that already leads (hinge 1) and drops the one that does not.
    loss = margin_hinge(logits, targets, 4.0, 1.0, protect_only=True)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_margin_shift_measures_the_leads_change():
    full = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    quant = torch.tensor([[2.5, 1.5, 0.0], [0.0, 2.0, 1.8]])
    # leads: 2 -> 1 and 1 -> 0.2
    assert margin_shift(full, quant, torch.tensor([0, 1])).tolist() == pytest.approx([1.0, 0.8])


def test_margin_shift_calibration_is_smaller_than_logit_noise(tiny_mix):
    from felix.config import ModelConfig
    from felix.model import FelixLM
    from felix.objective import calibrate_margin
    from felix.quail import Whitelist

    torch.manual_seed(0)
    model = FelixLM(ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=32))
    x = torch.randint(0, 512, (2, 32))
    y = torch.randint(0, 512, (2, 32))
    wl = Whitelist(tuple(int(t) for t in y[0, :4]), ("a", "b", "c", "d"))
    noise = calibrate_margin(model, [(x, y)], wl, "rq3", 99.0, "logit_noise")
    shift = calibrate_margin(model, [(x, y)], wl, "rq3", 99.0, "margin_shift")
    assert 0 < shift < noise


def test_margin_from_noise_samples_all_positions_beyond_quantiles_limit():
    """torch.quantile takes at most 2^24 values: logit noise at a 32K vocab passes that after 512 positions,
    and the margin came from those first positions alone."""
    noise = torch.zeros(2 * QUANTILE_MAX)
    noise[QUANTILE_MAX:] = 1.0  # the later half of the positions is the noisier one
    assert margin_from_noise(noise, 99.0) == 2.0


def test_a_schema_token_bpe_glues_to_what_follows_is_named_with_its_variants(tmp_path):
    """`{` whitelisted where the data's JSON opens with `{"`: byte-level BPE makes `{"` one token, QUAIL protects
    only the `{` id, and before nothing said that almost no target was it."""
    import json

    from felix.tokenizer import train_tokenizer

    lines = [json.dumps({"id": i, "gist": f"note {i}", "tags": ["a", "b"]}) for i in range(300)]
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    tok = train_tokenizer([tmp_path / "src.jsonl"], 400, tmp_path / "tok.json")
    glued = tok.encode('{"')
    assert len(glued) == 1, "the corpus should make {\" one token"
    targets = torch.tensor(tok.encode("\n".join(lines)))
    note = unprotected_variants(tok, resolve_whitelist(tok, ["{", "<|end|>"]), targets)
    assert note is not None and note.startswith("'{' is the target 0 times in the sample")
    assert "'{\"' 300" in note, note
    # with the variant listed there is nothing to say
    assert unprotected_variants(tok, resolve_whitelist(tok, ['{"']), targets) is None


@pytest.mark.parametrize(("piece", "token", "variant"), [
    (b'{"', b"{", True), (b"{\n", b"{", True), (b"},", b"}", True),
    (b"In", b"I", False), (b"_x", b"_", False),  # a letter or digit after it makes another word
    (b"{", b"{", False), (b"x{", b"{", False), (b"{\xc3\xa9", b"{", False),
])
def test_a_variant_is_the_token_glued_to_punctuation_or_whitespace(piece, token, variant):
    from felix.quail import _glued

    assert _glued(piece, token) is variant
