"""`felix serve`'s /v1/chat/completions is strict the way OpenAI is: an unknown model is OpenAI's 404
`model_not_found`, a field it does not implement is a 400 naming it unless it is harmless to ignore, and
`logprobs` / `top_logprobs` are real: the model's log-probabilities in OpenAI's shape, streamed too;
`stream_options.include_usage` decides whether a stream reports usage; `GET /v1/models/{id}` is OpenAI's.
The real openai SDK against a real server on the tiny model of test_splice_server (read-only: no writes)."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from test_splice_server import base_ckpt, call, ckpt  # noqa: F401 (shared fixtures)

from felix.server import FelixHTTPServer, make_server
from felix.server_api import SpliceService
from felix.tokenizer import FelixTokenizer

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "count the stones"}]


@contextlib.contextmanager
def serving(path, model_id: str = "felix") -> Iterator[tuple[FelixHTTPServer, openai.OpenAI]]:
    server = make_server(SpliceService.load(path, model_id=model_id), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        server.service.close()


@pytest.fixture(scope="module")
def served(base_ckpt) -> Iterator[tuple[FelixHTTPServer, openai.OpenAI]]:  # noqa: F811 (the fixture's name)
    with serving(base_ckpt) as pair:
        yield pair


def test_an_unknown_model_is_openais_404_model_not_found(base_ckpt):  # noqa: F811 (the fixture's name)
    with serving(base_ckpt, model_id="mine") as (server, client):
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as err:
                client.chat.completions.create(model="felix", messages=MESSAGES, max_tokens=4, stream=stream)
            assert err.value.status_code == 404 and err.value.code == "model_not_found" and err.value.param is None
            assert err.value.body["message"] == "The model `felix` does not exist or you do not have access to it."
            assert err.value.body["type"] == "invalid_request_error"
        # --model-name's id is the model; a body without one (curl, llama.cpp's clients) gets it too
        assert client.chat.completions.create(model="mine", messages=MESSAGES, max_tokens=4).model == "mine"
        status, out = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})
        assert status == 200 and out["model"] == "mine"
        status, out = call(server, "/v1/chat/completions", {"model": 7, "messages": MESSAGES})
        assert status == 400 and out["error"]["param"] == "model"


REFUSED = [
    ("tools", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "unsupported_parameter"),
    ("tool_choice", dict(tool_choice="auto"), "unsupported_parameter"),
    ("functions", dict(functions=[{"name": "f", "parameters": {}}]), "unsupported_parameter"),
    ("function_call", dict(function_call="auto"), "unsupported_parameter"),
    ("parallel_tool_calls", dict(parallel_tool_calls=False), "unsupported_parameter"),
    ("audio", dict(audio={"voice": "alloy", "format": "wav"}), "unsupported_parameter"),
    ("modalities", dict(modalities=["text", "audio"]), "unsupported_value"),
    ("prediction", dict(prediction={"type": "content", "content": "x"}), "unsupported_parameter"),
    ("reasoning_effort", dict(reasoning_effort="low"), "unsupported_parameter"),
    ("verbosity", dict(verbosity="low"), "unsupported_parameter"),
    ("web_search_options", dict(web_search_options={}), "unsupported_parameter"),
    ("frequency_penalty", dict(frequency_penalty=0.5), "unsupported_value"),
    ("presence_penalty", dict(presence_penalty=-1), "unsupported_value"),
    ("logit_bias", dict(logit_bias={"5": 100}), "unsupported_value"),
    ("response_format", dict(response_format={"type": "json_object"}), "unsupported_value"),
    ("top_k", dict(extra_body={"top_k": 5}), "unknown_parameter"),  # vLLM's, not OpenAI's: a typo to us
    ("n", dict(n=2), "unsupported_value"),
    ("top_logprobs", dict(top_logprobs=2), "SPLICE_BAD_REQUEST"),  # needs logprobs=True
    ("top_logprobs", dict(logprobs=True, top_logprobs=21), "SPLICE_BAD_REQUEST"),
    ("stream_options", dict(stream_options={"include_usage": True}), "SPLICE_BAD_REQUEST"),  # needs stream
    ("temperature", dict(temperature=3), "SPLICE_BAD_REQUEST"),
]


@pytest.mark.parametrize(("param", "kw", "code"), REFUSED, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(REFUSED)])
def test_a_field_that_changes_the_answer_and_is_not_implemented_is_refused_by_name(served, param, kw, code):
    server, client = served
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "felix", "messages": MESSAGES, "max_tokens": 8} | kw)
    assert (err.value.param, err.value.code) == (param, code), err.value.body
    assert param in err.value.message


def test_harmless_fields_and_neutral_values_leave_the_answer_as_it_was(served):
    server, client = served
    plain = client.chat.completions.create(model="felix", messages=MESSAGES, max_tokens=8, temperature=0)
    same = client.chat.completions.create(
        model="felix", messages=MESSAGES, max_tokens=8, temperature=0, user="u", metadata={"k": "v"},
        store=False, service_tier="auto", safety_identifier="s", prompt_cache_key="c", frequency_penalty=0,
        presence_penalty=0.0, logit_bias={}, modalities=["text"], response_format={"type": "text"},
        tools=None, tool_choice=None, logprobs=False)
    assert same.choices[0].message.content == plain.choices[0].message.content
    # the envelope as OpenAI writes it
    status, out = call(server, "/v1/chat/completions", {"messages": MESSAGES, "tools": []})
    assert status == 400 and out["error"] == {"message": "Unsupported parameter: 'tools': felix serve has no tool "
                                              "calling", "type": "invalid_request_error", "param": "tools",
                                              "code": "unsupported_parameter"}



def test_max_completion_tokens_wins_over_the_deprecated_max_tokens(served):
    """Before: a client sending both got max_tokens' limit; OpenAI deprecates it for max_completion_tokens, which
    vLLM reads first too."""
    server, client = served
    both = client.chat.completions.create(model="felix", messages=MESSAGES, temperature=0, max_tokens=2,
                                          max_completion_tokens=5)
    alone = client.chat.completions.create(model="felix", messages=MESSAGES, temperature=0, max_completion_tokens=5)
    assert both.usage.completion_tokens == alone.usage.completion_tokens
    assert both.choices[0].message.content == alone.choices[0].message.content
    assert both.usage.completion_tokens > 2 or both.choices[0].finish_reason == "stop"

def greedy_logprobs(service: SpliceService, n: int) -> list[tuple[int, torch.Tensor]]:
    """Greedy decoding without the server's KV cache: each token and the log-softmax it was chosen from."""
    ids = service.chat_ids(MESSAGES)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(service.model(torch.tensor([ids]))[0, -1].float(), -1)
            tid = int(logp.argmax())
            if tid in service.stop_ids:
                break
            out.append((tid, logp))
            ids.append(tid)
    return out


def text_of(entries: list) -> str:
    return b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")


def test_logprobs_are_the_models_in_openais_shape_streamed_or_not(served):
    server, client = served
    kw = dict(model="felix", messages=MESSAGES, max_tokens=30, temperature=0, logprobs=True, top_logprobs=3)
    resp = client.chat.completions.create(**kw)
    content, entries = resp.choices[0].message.content, resp.choices[0].logprobs.content
    tok = server.service.tok
    expected = greedy_logprobs(server.service, 30)
    assert len(entries) == len(expected) >= 10 and text_of(entries) == content
    for e, (tid, logp) in zip(entries, expected, strict=True):
        assert bytes(e.bytes).decode("utf-8", "replace") == tok.decode([tid])
        assert e.logprob == pytest.approx(float(logp[tid]), abs=1e-4)
        values, order = torch.topk(logp, 3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert [bytes(t.bytes).decode("utf-8", "replace") for t in e.top_logprobs] == \
            [tok.decode([i]) for i in order.tolist()]
        assert e.top_logprobs[0].bytes == e.bytes  # greedy: the likeliest token is the one chosen
    # logprobs alone: the chosen tokens' with no rivals
    alone = client.chat.completions.create(**kw | {"top_logprobs": None}).choices[0].logprobs.content
    assert [(e.token, e.logprob, e.top_logprobs) for e in alone] == [(e.token, e.logprob, []) for e in entries]

    # streamed: each chunk carries the tokens its text releases, together the same entries
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.bytes, e.logprob) for e in streamed] == [(e.bytes, e.logprob) for e in entries]
    assert sum(bool(c.choices[0].logprobs and c.choices[0].logprobs.content) for c in chunks) > 1

    # a stop string cuts the text: the tokens listed are those that begin before the cut
    at = next(i for i in range(len(content) // 2, len(content) - 2)
              if content.find(content[i:i + 2]) == i and "\ufffd" not in content[i:i + 2])
    cut = client.chat.completions.create(**kw | {"stop": [content[at:at + 2]]}).choices[0]
    assert cut.message.content == content[:at] and cut.finish_reason == "stop"
    listed = cut.logprobs.content
    assert text_of(listed).startswith(content[:at]) and len(text_of(listed[:-1])) < at


def test_token_bytes_are_the_bytes_decoding_joins(base_ckpt):  # noqa: F811 (the fixture's name)
    tok = FelixTokenizer.load(base_ckpt / "tokenizer.json")
    text = "seven wizards é 😊 <|end|> ∑"
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()
    rng = random.Random(0)
    for _ in range(200):  # any sequence, split characters and special tokens included
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", "replace") == tok.decode(ids)


def test_a_model_is_retrieved_by_its_id_and_another_id_is_model_not_found(ckpt):  # noqa: F811 (the fixture)
    with serving(ckpt, model_id="org/mine v2") as (server, client):  # the SDK percent-encodes the / and space
        got = client.models.retrieve("org/mine v2")  # was a generic 404 'no route'
        assert (got.id, got.object, got.owned_by) == ("org/mine v2", "model", "felix")
        assert got.model_dump() == client.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("felix")
        assert err.value.code == "model_not_found" and err.value.body["type"] == "invalid_request_error"
        assert err.value.body["message"] == "The model `felix` does not exist or you do not have access to it."
        status, out = call(server, "/v1/models/org%2Fmine%20v2", method="POST", raw=b"{}")
        assert status == 405 and out["error"]["code"] == "METHOD_NOT_ALLOWED"


def sse_events(server: FelixHTTPServer, body: dict) -> list[dict]:
    """A streamed chat completion's events as sent, parsed ([DONE] last, as the string)."""
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        events = [e.removeprefix("data: ") for e in resp.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


def test_a_stream_reports_usage_only_when_include_usage_asks_in_a_last_chunk_without_choices(served):
    server, client = served
    kw = dict(model="felix", messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None  # was: usage on the finish chunk, no chunk after it
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    # as sent: "usage": null on every other chunk; without include_usage (or with it false) no chunk has one
    events = sse_events(server, kw | {"stream": True, "stream_options": {"include_usage": True}})
    assert [e["usage"] for e in events[:-2]] == [None] * (len(events) - 2) and events[-2]["choices"] == []
    for options in (None, {"include_usage": False}):
        events = sse_events(server, kw | {"stream": True, "stream_options": options})
        assert not any("usage" in e for e in events[:-1])  # was: usage on the finish chunk
        assert events[-2]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
