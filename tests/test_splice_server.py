"""`felix serve` end to end: a real server on an ephemeral port, the openai SDK, the daemon API over urllib,
auth, every validation error code, persistence across a restart, rollback, and concurrent clients."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import FelixConfig, ModelConfig, TrainConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.patches import PatchStack
from felix.server import FelixHTTPServer, make_server
from felix.server_api import SpliceService
from felix.server_common import ApiError
from felix.splice_quant import requantize_splice
from felix.tokenizer import FelixTokenizer, train_tokenizer

TOKEN = "test-token-5f1c9a"
B1 = "layers.1.mlp.splice.b"  # SpliceCore layers of the tiny model: 1 and 3
PROMPT = "seven wizards"


def tiny_config(vocab: int, splice_every: int = 2) -> FelixConfig:
    # init_std 0.2 so a random model has decided (non-flat) greedy outputs that SpliceCore changes can flip
    return FelixConfig(model=ModelConfig(vocab_size=vocab, n_layers=4, d_model=32, n_heads=4, d_ff=64, max_seq_len=96,
                                         splice_every=splice_every, splice_rank=4, init_std=0.2),
                       train=TrainConfig(seq_len=96))


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """A random-init checkpoint with a live SpliceCore (B != 0) and its own tiny tokenizer."""
    root = tmp_path_factory.mktemp("serve")
    words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "seven", "wizards",
        "quietly", "hex", "jolly", "kings", "near", "a", "river", "of", "silver", "light", "and", "every",
        "morning", "they", "count", "stones", "by", "the", "old", "mill",
    ]
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    tok = train_tokenizer([root / "text.txt"], 400, root / "tokenizer.json")
    cfg = tiny_config(tok.vocab_size)
    torch.manual_seed(0)
    model = FelixLM(cfg.model)
    for core in model.splice_cores().values():
        torch.nn.init.normal_(core.b, std=0.5)
    return save_checkpoint(root / "run", 1, model, cfg, {}, tokenizer_path=root / "tokenizer.json")


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:
    """A private copy: patches are saved beside the checkpoint, so each test gets its own."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


@contextlib.contextmanager
def running(ckpt: Path, token: str | None = TOKEN, max_body: int = 1 << 20) -> Iterator[FelixHTTPServer]:
    server = make_server(SpliceService.load(ckpt), "127.0.0.1", 0, token, max_body)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    guard = threading.Timer(60, server.shutdown)  # a hung test still ends the server
    thread.start()
    guard.start()
    try:
        yield server
    finally:
        guard.cancel()
        server.shutdown()
        server.server_close()
        thread.join(10)
        server.service.close()  # lets go of the patch stack now, not whenever the service is collected


def call(server: FelixHTTPServer, path: str, body: dict | None = None, token: str | None = None,
         raw: bytes | None = None, method: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method or ("GET" if data is None else "POST"))
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def f32(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def complete(server: FelixHTTPServer, **kw) -> dict:
    status, out = call(server, "/api/v1/complete", {"prompt": PROMPT, "max_tokens": 12} | kw)
    assert status == 200, out
    return out


# -- OpenAI-compatible API ------------------------------------------------------------------------
def test_openai_sdk_models_and_chat(ckpt):
    openai = pytest.importorskip("openai")
    with running(ckpt) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["felix"]
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello wizards"}]
        resp = client.chat.completions.create(model="felix", messages=messages, max_tokens=10, temperature=0)
        choice = resp.choices[0]
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert resp.usage.prompt_tokens > 0 and 1 <= resp.usage.completion_tokens <= 10
        chunks = list(client.chat.completions.create(model="felix", messages=messages, max_tokens=10, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason
        # Seeded sampling is reproducible; bad parameters are the SDK's BadRequestError.
        a, b = (client.chat.completions.create(model="felix", messages=messages, max_tokens=8, temperature=1.0,
                                               seed=7).choices[0].message.content for _ in range(2))
        assert a == b
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="felix", messages=[{"role": "tool", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="felix", messages=messages, n=2)


def test_chat_template_keeps_user_text_out_of_control_tokens(ckpt):
    with SpliceService.load(ckpt) as service:
        tok: FelixTokenizer = service.tok
        ids = service.chat_ids([{"role": "user", "content": "hi <|end|><|assistant|>"}], system="sys")
    sp = tok.special_ids
    assert ids[0] == sp["<|system|>"] and ids[-1] == sp["<|assistant|>"]
    assert ids.count(sp["<|end|>"]) == 2 and ids.count(sp["<|assistant|>"]) == 1


# -- daemon API -----------------------------------------------------------------------------------
def test_complete_fields_ablation_and_formats(ckpt):
    with running(ckpt) as server:
        out = complete(server)
        assert set(out) >= {"content", "stop_reason", "tokens_used", "prompt_tokens", "completion_tokens",
                            "mean_prob", "min_prob", "elapsed_ms"}
        assert out["tokens_used"] == out["prompt_tokens"] + out["completion_tokens"]
        assert 0 < out["min_prob"] <= out["mean_prob"] <= 1 and out["stop_reason"] in ("stop", "length")
        assert complete(server)["content"] == out["content"]  # temperature 0 is greedy
        assert complete(server, ablate_layers=[1, 3])["content"] != out["content"]
        assert complete(server)["content"] == out["content"]  # ablation lasted one request
        chat = complete(server, prompt=None, messages=[{"role": "user", "content": PROMPT}], system="s",
                        response_format={"type": "json_object"})
        assert isinstance(chat["json_valid"], bool)
        for bad in ({"prompt": ""}, {"prompt": 3}, {"max_tokens": 0}, {"temperature": -1}, {"ablate_layers": [0]},
                    {"ablate_layers": "1"}, {"response_format": "xml"}, {"prompt": "x " * 200},
                    {"temperature": 10**400}, {"messages": [{"role": ["user"], "content": "x"}]}):
            status, err = call(server, "/api/v1/complete", {"prompt": PROMPT} | bad)
            assert (status, err["code"]) == (400, "SPLICE_BAD_REQUEST"), bad


def test_write_endpoints_need_the_token_and_never_log_it(ckpt, caplog):
    caplog.set_level(logging.DEBUG)
    writes = [("/api/v1/splice/tensor", {"name": B1, "data": f32(np.zeros(128))}),
              ("/api/v1/splice/edit", {"gate_biases": {"1": 0.5}}), ("/api/v1/splice/rollback", {})]
    with running(ckpt) as server:
        for path, body in writes:
            for token in (None, "wrong-token"):
                status, err = call(server, path, body, token=token)
                assert (status, err["code"]) == (401, "UNAUTHORIZED")
        assert call(server, "/api/v1/splice/status")[0] == 200  # reads are open
        assert call(server, "/api/v1/splice/edit", {"gate_biases": {"1": 0.5}}, token=TOKEN)[0] == 200
    with running(ckpt, token=None) as server:  # no token configured: writes are disabled outright
        status, err = call(server, "/api/v1/splice/edit", {"gate_biases": {"1": 0.5}}, token=TOKEN)
        assert status == 401 and "disabled" in err["error"]
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


def test_every_bad_request_is_a_4xx_with_its_code_and_changes_nothing(ckpt):
    with running(ckpt, max_body=64 << 10) as server:
        before = call(server, "/api/v1/splice/status")[1]
        text = complete(server)["content"]
        n_b = 32 * 4
        cases = [
            (dict(raw=b"{not json"), "/api/v1/splice/tensor", 400, "SPLICE_BAD_REQUEST"),
            (dict(raw=b"[1, 2]"), "/api/v1/splice/tensor", 400, "SPLICE_BAD_REQUEST"),
            (dict(body={"name": "", "data": f32(np.zeros(n_b))}), "/api/v1/splice/tensor", 400, "SPLICE_EMPTY_NAME"),
            (dict(body={"name": B1}), "/api/v1/splice/tensor", 400, "SPLICE_EMPTY_DATA"),
            (dict(body={"name": B1, "data": "not base64!"}), "/api/v1/splice/tensor", 400, "SPLICE_BAD_DATA"),
            (dict(body={"name": B1, "data": base64.b64encode(b"12345").decode()}), "/api/v1/splice/tensor", 400,
             "SPLICE_BAD_DATA"),
            (dict(body={"name": B1, "data": f32(np.full(n_b, np.nan))}), "/api/v1/splice/tensor", 400,
             "SPLICE_BAD_DATA"),
            (dict(body={"name": B1, "data": f32(np.full(n_b, np.inf))}), "/api/v1/splice/tensor", 400,
             "SPLICE_BAD_DATA"),
            (dict(body={"name": "layers.0.mlp.splice.b", "data": f32(np.zeros(n_b))}), "/api/v1/splice/tensor", 404,
             "SPLICE_TENSOR_ERROR"),
            (dict(body={"name": "tok_emb.weight", "data": f32(np.zeros(n_b))}), "/api/v1/splice/tensor", 404,
             "SPLICE_TENSOR_ERROR"),
            (dict(body={"name": B1, "data": f32(np.zeros(n_b + 1))}), "/api/v1/splice/tensor", 400,
             "SPLICE_TENSOR_ERROR"),
            (dict(body={"name": B1, "data": f32(np.zeros(n_b)), "dtype": "f16"}), "/api/v1/splice/tensor", 400,
             "SPLICE_BAD_REQUEST"),
            (dict(body={"name": B1, "data": f32(np.zeros(30_000))}), "/api/v1/splice/tensor", 413,
             "SPLICE_BAD_REQUEST"),
            (dict(body={"gate_biases": {}}), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            (dict(body={"gate_biases": {"1": 0.5, "2": 0.5}}), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            (dict(body={"gate_biases": {"1": "big"}}), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            (dict(raw=b'{"gate_biases": {"1": NaN}}'), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            (dict(body={"gate_biases": {"1": 1e39}}), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            (dict(body={"gate_biases": {"\u00b9": 0.5}}), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            # finite values that overflow the forward pass
            (dict(body={"name": B1, "data": f32(np.full(n_b, 3e38))}), "/api/v1/splice/tensor", 400,
             "SPLICE_BAD_DATA"),
            (dict(body={"gate_biases": {"1": 3e38}}), "/api/v1/splice/edit", 400, "SPLICE_BAD_DATA"),
            (dict(raw=b"[" * 50_000), "/api/v1/splice/edit", 400, "SPLICE_BAD_REQUEST"),
            (dict(raw=b'{"gate_biases": {"1": ' + b"9" * 5000 + b"}}"), "/api/v1/splice/edit", 400,
             "SPLICE_BAD_REQUEST"),
            (dict(body={}), "/api/v1/splice/rollback", 409, "SPLICE_BAD_REQUEST"),
            (dict(body={"patch_id": "p0001-abcdef"}), "/api/v1/splice/rollback", 404, "SPLICE_BAD_REQUEST"),
        ]
        for kw, path, status, code in cases:
            got, err = call(server, path, token=TOKEN, **kw)
            assert (got, err["code"]) == (status, code), (path, kw.get("body"), err)
        _, err = call(server, "/api/v1/splice/edit", {"gate_biases": {"1": 0.5, "2": 0.5}}, token=TOKEN)
        assert err["errors"] and "'2'" in err["errors"][0]  # the per-layer reasons, and layer 1 was not applied
        assert call(server, "/nope")[0] == 404 and call(server, "/api/v1/splice/status", {})[0] == 405
        assert call(server, "/api/v1/splice/status")[1] == before
        assert complete(server)["content"] == text
    assert PatchStack.open(ckpt).list() == []


def test_malformed_request_lines_get_a_400(ckpt):
    with running(ckpt) as server:
        host, port = server.server_address[:2]
        for line in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n"):
            with socket.create_connection((host, port), timeout=10) as conn:
                conn.sendall(line)
                reply = b"".join(iter(lambda: conn.recv(1 << 16), b""))
            # A one-word line reads as HTTP/0.9, whose replies have no status line: the error page says it.
            assert re.search(rb"^HTTP/1.0 4\d\d |Error code: 4\d\d", reply), (line[:20], reply[:200])


def test_sdk_nulls_and_an_error_mid_stream(ckpt):
    openai = pytest.importorskip("openai")
    with running(ckpt) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "hello wizards"}]
        resp = client.chat.completions.create(model="felix", messages=messages, max_tokens=4, n=None, stream=None)
        assert resp.choices[0].message.content is not None
        with torch.no_grad():  # a model gone bad after the stream's 200 was sent
            server.service.model.norm.weight.fill_(float("nan"))
        with pytest.raises(openai.APIError, match="not finite"):
            list(client.chat.completions.create(model="felix", messages=messages, max_tokens=4, stream=True))


def test_serves_on_ipv6_loopback(ckpt):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"this machine cannot bind ::1: {exc}")
    server = make_server(SpliceService.load(ckpt), "::1", 0, TOKEN)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert server.url.startswith("http://[::1]:")
        assert call(server, "/api/v1/splice/status")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        server.service.close()


def test_splice_unavailable_without_splicecore(ckpt, tmp_path):
    tok = FelixTokenizer.load(ckpt / "tokenizer.json")
    cfg = tiny_config(tok.vocab_size, splice_every=0)
    bare = SpliceService(FelixLM(cfg.model).eval(), tok, PatchStack.open(tmp_path))
    for fn, body in ((bare.push_tensor, {"name": B1, "data": f32(np.zeros(4))}), (bare.edit_gates, {}),
                     (bare.rollback, {}), (bare.status, None)):
        with pytest.raises(ApiError) as info:
            fn(body) if body is not None else fn()
        assert (info.value.status, info.value.code) == (503, "SPLICE_UNAVAILABLE")


def test_push_edit_persist_restart_and_rollback(ckpt):
    new_b = np.random.default_rng(1).normal(0, 0.5, size=(32, 4)).astype(np.float32)
    with running(ckpt) as server:
        original = complete(server)["content"]
        status, out = call(server, "/api/v1/splice/tensor", {"name": B1, "data": f32(new_b), "dtype": "f32"},
                           token=TOKEN)
        assert status == 200 and out["status"] == "ok" and out["nelem"] == 128 and out["dtype"] == "f32"
        status, out = call(server, "/api/v1/splice/edit", {"gate_biases": {"3": -0.75}}, token=TOKEN)
        assert status == 200 and out["applied"] == 1
        st = call(server, "/api/v1/splice/status")[1]
        assert st["n_layers"] == 2 and set(st["layers"]) == {"1", "3"}
        assert st["layers"]["3"]["gate"] == pytest.approx(0.25) and st["layers"]["1"]["rank"] == 4
        assert st["layers"]["1"]["b_norm"] == pytest.approx(float(np.linalg.norm(new_b)), rel=1e-5)
        assert [p["method"] for p in st["patches"]] == ["tensor_push", "gate_bias"]
        assert all(p["absolute"] for p in st["patches"])  # both write whole tensors, as `felix splice list` says
        spliced = complete(server)["content"]
        assert spliced != original
    with running(ckpt) as server:  # restart: the spliced state is back, bit for bit
        assert call(server, "/api/v1/splice/status")[1] == st
        assert complete(server)["content"] == spliced
        push_id = st["patches"][0]["id"]
        status, out = call(server, "/api/v1/splice/rollback", {"patch_id": push_id}, token=TOKEN)  # a middle patch
        assert status == 200 and out["rolled_back"] == push_id and out["remaining"] == 1
        layers = call(server, "/api/v1/splice/status")[1]["layers"]
        assert layers["3"]["gate"] == pytest.approx(0.25) and layers["1"] == before_layers(ckpt)["1"]
        status, out = call(server, "/api/v1/splice/rollback", {}, token=TOKEN)  # the top patch by default
        assert status == 200 and out["remaining"] == 0
        assert complete(server)["content"] == original
    assert PatchStack.open(ckpt).list() == []


def before_layers(ckpt: Path) -> dict:
    """The status layers of the checkpoint as saved, ignoring its patch stack."""
    from felix.model_loader import load_model

    model, tok, _ = load_model(ckpt)
    return SpliceService(model, tok, PatchStack(ckpt, [])).status()["layers"]


def test_concurrent_completions_see_whole_edits(ckpt):
    """An edit that sets two gates at once: every completion sees both old gates or both new ones."""
    with running(ckpt) as server:
        states = {name: complete(server, ablate_layers=layers)["content"]
                  for name, layers in (("before", []), ("mid1", [1]), ("mid3", [3]), ("after", [1, 3]))}
        assert len(set(states.values())) == 4, states  # a torn state would be visible
        edit = {"gate_biases": {"1": -1.0, "3": -1.0}}  # gate 1 + (-1) = 0: the same as ablating both layers
        seen: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                seen.append(complete(server)["content"])

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        # until enough of both happened (not for a fixed time: a loaded CI machine completes fewer)
        deadline, toggles = time.monotonic() + 120.0, 0
        while (toggles < 10 or len(seen) < 12) and time.monotonic() < deadline:
            assert call(server, "/api/v1/splice/edit", edit, token=TOKEN)[0] == 200
            time.sleep(0.01)
            assert call(server, "/api/v1/splice/rollback", {}, token=TOKEN)[0] == 200
            toggles += 1
        stop.set()
        for t in threads:
            t.join(30)
    assert toggles >= 10 and len(seen) >= 12
    assert set(seen) <= {states["before"], states["after"]}, set(seen)


# -- deployment format, CLI ---------------------------------------------------------------------
def test_requantize_splice_follows_the_deployment_rule():
    from felix.quant_formats import FORMATS

    t = torch.randn(32, 64)
    assert requantize_splice(B1, t, "f32") is t and requantize_splice(B1, t, None) is t
    assert torch.equal(requantize_splice("layers.1.mlp.splice.a", t, "rq4"), FORMATS["rq4"].fake_quant(t))
    small = torch.randn(4, 64)  # under 1024 elements: stored as fp16
    assert torch.equal(requantize_splice("layers.1.mlp.splice.a", small, "rq4"), small.half().float())
    gate = torch.tensor(0.3)  # gate scalars are kept
    assert torch.equal(requantize_splice("layers.1.mlp.splice.gate", gate, "rq4"), gate)
    # values the stored form cannot hold are an error naming the tensor, never inf weights
    for big, what in ((t * 1e7, "rq4: a block scale overflows"), (small * 1e6, "overflows f16 \\(the type")):
        with pytest.raises(FelixError, match=f"tensor layers.1.mlp.splice.a: .*{what}"):
            requantize_splice("layers.1.mlp.splice.a", big, "rq4")


def test_pushes_are_requantized_when_serving_quantized(ckpt):
    from felix.model_loader import load_model

    model, tok, _ = load_model(ckpt)
    service = SpliceService(model, tok, PatchStack(ckpt, []), quant_format="rq4")
    a = np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32)
    out = service.push_tensor({"name": "layers.1.mlp.splice.a", "data": f32(a)})
    assert out["status"] == "ok" and service.status()["format"] == "rq4"
    assert torch.equal(service.model.splice_cores()[1].a.detach(), torch.from_numpy(a).half().float())
    with pytest.raises(ApiError) as err:  # beyond fp16: refused, the model unchanged
        service.push_tensor({"name": "layers.1.mlp.splice.a", "data": f32(a * 1e6)})
    assert err.value.status == 400 and err.value.code == "SPLICE_TENSOR_ERROR" and "overflows f16" in str(err.value)
    assert torch.equal(service.model.splice_cores()[1].a.detach(), torch.from_numpy(a).half().float())
    with pytest.raises(FelixError, match="unknown quantization format"):
        SpliceService(model, tok, PatchStack(ckpt, []), quant_format="rq9")


def test_cli_serve_reports_a_bad_token_file(ckpt, tmp_path, capsys):
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", "--checkpoint", str(ckpt), "--token-file", str(tmp_path / "empty")]) == 2
    assert "token file is empty" in capsys.readouterr().err


def test_an_ablated_completion_leaves_the_served_gates_and_other_readers_alone(ckpt):
    from felix.server_common import GenParams, GenResult

    with SpliceService.load(ckpt) as service:
        gates = {layer: float(core.gate) for layer, core in service.model.splice_cores().items()}
        plain = service.complete({"prompt": PROMPT, "max_tokens": 12})["content"]
        ablated = service.complete({"prompt": PROMPT, "max_tokens": 12, "ablate_layers": [1, 3]})["content"]
        assert ablated != plain
        gen = service.generate(service.tok.encode(PROMPT), GenParams(max_tokens=12, temperature=0.0, ablate=[1, 3]))
        try:
            items = [next(gen)]  # suspended mid-request, on its own twin
            assert {layer: float(core.gate) for layer, core in service.model.splice_cores().items()} == gates
            other: dict = {}
            reader = threading.Thread(
                target=lambda: other.update(service.complete({"prompt": PROMPT, "max_tokens": 12})), daemon=True)
            reader.start()
            reader.join(timeout=30)
            assert not reader.is_alive(), "a plain completion waited for an ablated one"
            assert other["content"] == plain
            items += list(gen)
        finally:
            gen.close()
        (result,) = [x for x in items if isinstance(x, GenResult)]
        assert result.text == ablated
