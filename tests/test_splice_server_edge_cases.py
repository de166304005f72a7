"""`felix serve` at its edges: empty or differently cased bearer tokens, absurd layer keys, huge finite tensors
(each against a real server on the tiny model of test_splice_server)."""

from __future__ import annotations

import http.client
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_splice_server import TOKEN, base_ckpt, call, f32, running  # noqa: F401 (shared fixture)

from felix.activation_bound import LIMIT, ActivationBound
from felix.checkpoint import save_checkpoint
from felix.model_loader import load_model
from felix.patches import PatchStack

EDIT = {"gate_biases": {"1": 0.5}}


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:  # noqa: F811 (the fixture's name)
    """A private copy: patches are saved beside the checkpoint."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


def post(server, path: str, body: dict, authorization: str | None) -> tuple[int, dict]:
    """POST with the Authorization header sent exactly as given (urllib would not send some of these)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        conn.request("POST", path, json.dumps(body).encode(), headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("configured", ["", "   "])
def test_an_empty_configured_token_lets_no_one_write(ckpt, configured):
    with running(ckpt, token=configured) as server:
        for authorization in ("Bearer ", "Bearer    ", "Bearer", configured):
            status, err = post(server, "/api/v1/splice/edit", EDIT, authorization)
            assert (status, err["code"]) == (401, "UNAUTHORIZED"), authorization
            assert "disabled" in err["error"]
    assert PatchStack.open(ckpt).list() == []


def test_the_bearer_scheme_is_case_insensitive_and_needs_the_token(ckpt):
    with running(ckpt) as server:
        assert post(server, "/api/v1/splice/edit", EDIT, f"bearer {TOKEN}")[0] == 200
        assert post(server, "/api/v1/splice/edit", EDIT, f"BEARER  {TOKEN} ")[0] == 200
        for wrong in (f"Basic {TOKEN}", f"Bearer{TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
            assert post(server, "/api/v1/splice/edit", EDIT, wrong)[0] == 401, wrong
    assert len(PatchStack.open(ckpt).list()) == 2


def test_a_gate_layer_of_thousands_of_digits_is_a_400_and_changes_nothing(ckpt):
    with running(ckpt) as server:
        before = call(server, "/api/v1/splice/status")[1]
        # int() refuses strings over 4300 digits: this was an uncaught ValueError, a 500
        status, err = call(server, "/api/v1/splice/edit", {"gate_biases": {"1" * 5000: 0.5}}, token=TOKEN)
        assert (status, err["code"]) == (400, "SPLICE_BAD_REQUEST"), err
        assert call(server, "/api/v1/splice/status")[1] == before
    assert PatchStack.open(ckpt).list() == []


def test_status_stays_strict_json_with_huge_finite_values_in_the_stack(ckpt):
    """A stack written by the library, not the server (whose writes refuse such values), can hold them."""
    a = np.full((4, 64), 1e20, dtype=np.float32)  # finite, but a·a overflows f32
    model = load_model(ckpt)[0]
    PatchStack.open(ckpt).apply(model, {"layers.3.mlp.splice.a": torch.from_numpy(a)}, {"method": "tensor"},
                                absolute=True)
    with running(ckpt) as server:
        status, out = call(server, "/api/v1/splice/status")
        assert status == 200
        text = json.dumps(out)
        # json.loads accepts Infinity; a strict parser (JSON.parse, most SDKs) does not
        json.loads(text, parse_constant=lambda c: pytest.fail(f"status is not JSON: it holds {c}"))
        layer = out["layers"]["3"]
        assert layer["a_norm"] == pytest.approx(1e20 * math.sqrt(a.size), rel=1e-6)
        assert math.isfinite(layer["delta_norm"]) and layer["delta_norm"] > 1e20
        bound = out["activation_bound"]
        assert bound["within"] is False and bound["residual"] > bound["limit"] == LIMIT


def test_a_restored_stack_past_the_bound_is_warned_about_at_startup(ckpt, capsys):
    """The server's writes keep the bound, but a stack written by the library or an older felix may not."""
    from felix.commands.serve import announce

    with running(ckpt) as server:
        announce(server, server.service, TOKEN, "127.0.0.1")
        assert call(server, "/api/v1/splice/status")[1]["activation_bound"]["within"] is True
    assert "could reach a norm" not in capsys.readouterr().err
    PatchStack.open(ckpt).apply(load_model(ckpt)[0], {"layers.3.mlp.splice.a": torch.full((4, 64), 1e20)},
                                {"method": "tensor"}, absolute=True)
    with running(ckpt) as server:
        announce(server, server.service, TOKEN, "127.0.0.1")
    err = capsys.readouterr().err
    assert "with the restored patch stack, layer 3's SpliceCore A·u could reach a norm of" in err
    assert "Roll back its latest patches" in err


def test_frozen_weights_past_the_bound_are_named_at_startup_and_in_each_refusal(ckpt, capsys):
    """Then no SpliceCore state is within the bound: the server says so once, and each refused write names the
    model, not a patch to roll back."""
    from felix.commands.serve import announce

    model, _, loaded = load_model(ckpt)
    with torch.no_grad():
        model.tok_emb.weight.mul_(LIMIT)
    big = save_checkpoint(ckpt.parent / "big", 1, model, loaded.config, {}, tokenizer_path=ckpt / "tokenizer.json")
    with running(big) as server:
        announce(server, server.service, TOKEN, "127.0.0.1")
        before = call(server, "/api/v1/splice/status")[1]
        status, err = call(server, "/api/v1/splice/edit", EDIT, token=TOKEN)
        assert (status, err.get("code")) == (400, "SPLICE_BAD_DATA"), err
        assert "whatever SpliceCore holds (the frozen weights alone allow it)" in err["error"]
        assert call(server, "/api/v1/splice/status")[1] == before
    out = capsys.readouterr().err
    assert "this model's frozen weights alone could drive the residual stream" in out
    assert "every splice write will be refused" in out and "Roll back" not in out


def test_a_push_that_some_input_could_drive_past_the_bound_is_a_400_and_changes_nothing(ckpt):
    """Before: a 1e20 `a` kept the probe prompt's logits finite and was applied. The residual's sum of squares
    overflows, RMSNorm returns zeros and every logit is 0 (on the 53.4M facts model, for every prompt tried):
    finite, so nothing refused it."""
    with running(ckpt) as server:
        before = call(server, "/api/v1/splice/status")[1]
        status, err = call(server, "/api/v1/splice/tensor", {"name": "layers.3.mlp.splice.a",
                                                              "data": f32(np.full((4, 64), 1e20))}, token=TOKEN)
        assert (status, err.get("code")) == (400, "SPLICE_BAD_DATA"), err
        assert "layer 3's SpliceCore A·u could reach a norm of" in err["error"]
        assert call(server, "/api/v1/splice/status")[1] == before
    assert PatchStack.open(ckpt).list() == []


@pytest.mark.parametrize("size", ["1e-9", "0", "nan", "inf"])
def test_a_body_limit_under_one_byte_or_not_finite_is_refused(tmp_path, capsys, size):
    """Before: 1e-9 MB rounded to a 0-byte limit (every request with a body a 413); nan and inf crashed."""
    from felix.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none"), "--max-body-mb", size]) == 2
    assert f"--max-body-mb must be a finite size of at least one byte, got {float(size)}" in capsys.readouterr().err


def test_a_tiny_positive_temperature_samples_what_greedy_does(base_ckpt):  # noqa: F811 (the fixture's name)
    """Before: logits / 1e-40 overflowed to inf, softmax gave NaN and the completion was a 500."""
    msg = {"messages": [{"role": "user", "content": "def "}], "max_tokens": 6}
    with running(base_ckpt) as server:
        status, greedy = call(server, "/v1/chat/completions", msg | {"temperature": 0})
        assert status == 200
        for t in (1e-40, 1e-45):
            status, tiny = call(server, "/v1/chat/completions", msg | {"temperature": t, "seed": 3})
            assert status == 200, tiny
            assert tiny["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_a_misspelt_write_field_or_a_conflicting_prompt_is_a_400_and_changes_nothing(ckpt):
    """Before: unknown fields were ignored, so a rollback naming its patch by `id` (the key status and
    `felix splice list --json` report) rolled back the top patch instead, and a `prompt` beside `messages` went
    unread. Completions still ignore fields they do not take, as the daemon (Go's JSON decoding) does."""
    with running(ckpt) as server:
        first = post(server, "/api/v1/splice/edit", EDIT, f"Bearer {TOKEN}")[1]["patch_id"]
        top = post(server, "/api/v1/splice/edit", {"gate_biases": {"1": -0.5}}, f"Bearer {TOKEN}")[1]["patch_id"]
        status, err = post(server, "/api/v1/splice/rollback", {"id": first}, f"Bearer {TOKEN}")
        assert (status, err.get("code")) == (400, "SPLICE_BAD_REQUEST"), err
        assert "'id'" in err["error"] and "patch_id" in err["error"]  # the field it meant
        for path, body in (("/api/v1/splice/edit", EDIT | {"layer": 1}),
                           ("/api/v1/splice/tensor", {"name": "layers.1.mlp.splice.gate", "data": f32(np.ones(1)),
                                                      "shape": [1]})):
            assert post(server, path, body, f"Bearer {TOKEN}")[0] == 400, body
        status, err = call(server, "/api/v1/complete", {"prompt": "def ", "messages": [{"role": "user",
                                                                                        "content": "x"}]})
        assert (status, err.get("code")) == (400, "SPLICE_BAD_REQUEST"), err
        assert call(server, "/api/v1/complete", {"prompt": "def ", "max_tokens": 2, "stream": False})[0] == 200
    assert [p.id for p in PatchStack.open(ckpt).list()] == [first, top]


def test_text_that_is_not_unicode_is_a_400_not_a_500(base_ckpt):  # noqa: F811 (the fixture's name)
    """Before: a JSON "\\ud800" escape (a lone surrogate) reached the tokenizer, whose FelixError the server
    answered as 500 INTERNAL_ERROR, with a traceback in its log."""
    lone = "def \ud800"
    with running(base_ckpt) as server:
        for path, body in (("/api/v1/complete", {"prompt": lone}),
                           ("/api/v1/complete", {"messages": [{"role": "user", "content": lone}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": lone}]})):
            status, err = call(server, path, body)
            assert status == 400, (path, body, err)
            assert "lone surrogate" in json.dumps(err), err


@pytest.mark.parametrize("name", ["", "  "])
def test_a_blank_model_name_is_refused(tmp_path, capsys, name):
    """Before: accepted, and /v1/models listed a model with a blank id that no client can name."""
    from felix.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none"), "--model-name", name]) == 2
    assert f"--model-name must not be empty or blank, got {name!r}" in capsys.readouterr().err


def test_an_artifact_is_served_in_its_own_format_only(base_ckpt, tmp_path, capsys):  # noqa: F811 (the fixture's name)
    """Before, an rq4 artifact served with --format q8_0 started without a word: its SpliceCore re-rounded to q8_0,
    and every push too, on weights that stay rq4 (a model neither format deploys), and its patch stack filled with
    writes off the artifact's grid."""
    from felix.cli import main
    from felix.errors import FelixError
    from felix.server_api import SpliceService

    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(base_ckpt), "--format", "rq4", "--out", str(art)]) == 0
    for fmt, pushes in (("q8_0", "rounded to q8_0"), ("rq3", "rounded to rq3"), ("f32", "left unrounded")):
        with pytest.raises(FelixError) as err:
            SpliceService.load(art, quant_format=fmt)
        assert f"a `felix quantize` artifact in rq4 cannot be served as {fmt} (--format {fmt}): its other weights " \
               f"stay rq4, so with its SpliceCore and every push {pushes} it would be" in str(err.value)
    for fmt in (None, "rq4"):  # its own format, by default or given
        with SpliceService.load(art, quant_format=fmt) as service:
            assert service.quant_format == "rq4"
    capsys.readouterr()
    assert main(["serve", "--checkpoint", str(art), "--format", "q8_0", "--port", "0"]) == 2
    assert "cannot be served as q8_0" in capsys.readouterr().err


def test_a_write_that_only_just_keeps_the_probe_finite_is_a_400_and_changes_nothing(ckpt):
    """Before: a gate of 2^120 passed (the probe prompt's logits stayed finite), but whether such a state
    overflows depends on the input: on the 4.6M demo a gate of 3e38 over a small pushed `a` was accepted and
    then every completion of most prompts was a 500 "logits are not finite". A write must leave SpliceCore
    2^20 of headroom on the probe, with every gate on."""
    with running(ckpt) as server:
        before = call(server, "/api/v1/splice/status")[1]
        for bias in (2.0**120, -(2.0**115)):
            status, err = call(server, "/api/v1/splice/edit", {"gate_biases": {"1": bias}}, token=TOKEN)
            assert (status, err.get("code")) == (400, "SPLICE_BAD_DATA"), (bias, err)
        n_b = 32 * 4  # d_model x rank
        status, err = call(server, "/api/v1/splice/tensor", {"name": "layers.1.mlp.splice.b",
                                                              "data": f32(np.full(n_b, 2.0**115))}, token=TOKEN)
        assert (status, err.get("code")) == (400, "SPLICE_BAD_DATA"), err
        assert call(server, "/api/v1/splice/status")[1] == before
        status, out = call(server, "/api/v1/splice/edit", {"gate_biases": {"1": 1e3}}, token=TOKEN)  # large, sane
        assert status == 200, out
        # a gated-off layer is probed as if on: a later gate edit or rollback can turn it on
        assert call(server, "/api/v1/splice/edit", {"gate_biases": {"3": -1.0}}, token=TOKEN)[0] == 200
        status, err = call(server, "/api/v1/splice/tensor", {"name": "layers.3.mlp.splice.b",
                                                              "data": f32(np.full(n_b, 2.0**115))}, token=TOKEN)
        assert (status, err.get("code")) == (400, "SPLICE_BAD_DATA"), err
    assert len(PatchStack.open(ckpt).list()) == 2


def test_a_rollback_that_joins_tensors_never_served_together_is_refused(ckpt):
    """Each write is probed with the tensors beside it then; removing a patch from the middle keeps a large `a`
    written below it and a large `b` written above it, a pair never served together. It was committed, and
    then every completion was a 500."""
    a_name, b_name = "layers.3.mlp.splice.a", "layers.3.mlp.splice.b"
    model = load_model(ckpt)[0]
    u, gate = ActivationBound(model).u[3], abs(float(model.splice_cores()[3].gate))
    big_a = LIMIT / (1e3 * 16 * u)  # ||A u|| at most LIMIT / 1e3 (A is 4 x 64: its norm is 16 entries)
    big_b = 1e8 / (gate * math.sqrt(32 * 4))  # with A 1e8 times smaller, gate·B·A·u stays under LIMIT / 1e3
    with running(ckpt) as server:
        original_a = call(server, "/api/v1/splice/status")[1]["layers"]["3"]["a_norm"]
        pushes = [(a_name, np.full((4, 64), big_a)), (a_name, np.full((4, 64), big_a * 1e-8)),
                  (b_name, np.full((32, 4), big_b))]
        ids = []
        for name, data in pushes:
            status, out = call(server, "/api/v1/splice/tensor", {"name": name, "data": f32(data)}, token=TOKEN)
            assert status == 200, out  # each alone keeps the outputs finite, with headroom
            ids.append(out["patch_id"])
        before = call(server, "/api/v1/splice/status")[1]
        status, err = call(server, "/api/v1/splice/rollback", {"patch_id": ids[1]}, token=TOKEN)
        assert (status, err.get("code")) == (409, "SPLICE_BAD_DATA"), err
        assert "roll back the later patches first" in err["error"]
        assert call(server, "/api/v1/splice/status")[1] == before
        status, out = call(server, "/api/v1/complete", {"prompt": "def ", "max_tokens": 2})
        assert status == 200, out
        for pid in (ids[2], ids[1], ids[0]):  # in the order advised, each rollback is allowed
            assert call(server, "/api/v1/splice/rollback", {"patch_id": pid}, token=TOKEN)[0] == 200
        assert call(server, "/api/v1/splice/status")[1]["layers"]["3"]["a_norm"] == pytest.approx(original_a)
    assert PatchStack.open(ckpt).list() == []
