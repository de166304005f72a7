"""The fake provider servers against the real openai / anthropic / google-genai SDKs.

These tests pin down two things: that the fakes are faithful enough for the SDKs to work unchanged, and which
exception each SDK raises for each fault (the table in tests/provider_servers.py, which production error handling
relies on). SDKs are imported lazily so that a missing one skips its cases only.
"""

from __future__ import annotations

import http.client
import importlib
import threading
import time
from typing import Any

import pytest
from provider_servers import ProviderServer, Request

KEY = "test-key-123"
TIMEOUT = 0.5  # client timeout (s); "timeout" faults hang longer than this
PROTOCOLS = ["openai", "anthropic", "gemini"]


def sdk(dotted: str) -> Any:
    """Import ``package.module.Name`` (or a module), skipping the test when the SDK isn't installed."""
    try:
        return importlib.import_module(dotted)
    except ImportError:
        module, _, name = dotted.rpartition(".")
        return getattr(pytest.importorskip(module), name)


def make_client(protocol: str, server: ProviderServer, timeout: float = TIMEOUT) -> Any:
    if protocol == "openai":
        return sdk("openai").OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=timeout)
    if protocol == "anthropic":
        return sdk("anthropic").Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=timeout)
    genai, types = sdk("google.genai"), sdk("google.genai.types")
    # HttpOptions.timeout is in milliseconds; genai does not retry unless retry_options is given.
    return genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.url, timeout=int(timeout * 1000)))


def ask(protocol: str, client: Any, user: str, system: str = "Be terse.", max_tokens: int = 64) -> dict:
    """One completion through the SDK, reduced to what the tests compare."""
    if protocol == "openai":
        r = client.chat.completions.create(model="gpt-fake", max_tokens=max_tokens, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": user}])
        return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                "usage": (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)}
    if protocol == "anthropic":
        r = client.messages.create(model="claude-fake", max_tokens=max_tokens, system=system,
                                   messages=[{"role": "user", "content": user}])
        return {"text": r.content[0].text, "finish": r.stop_reason,
                "usage": (r.usage.input_tokens, r.usage.output_tokens, r.usage.input_tokens + r.usage.output_tokens)}
    types = sdk("google.genai.types")
    r = client.models.generate_content(model="gemini-fake", contents=user, config=types.GenerateContentConfig(
        system_instruction=system, max_output_tokens=max_tokens, temperature=0.0))
    u = r.usage_metadata
    return {"text": r.text, "finish": r.candidates[0].finish_reason.value,
            "usage": (u.prompt_token_count, u.candidates_token_count, u.total_token_count)}


FINISH = {"openai": ("stop", "length"), "anthropic": ("end_turn", "max_tokens"), "gemini": ("STOP", "MAX_TOKENS")}
MODEL = {"openai": "gpt-fake", "anthropic": "claude-fake", "gemini": "gemini-fake"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_trip(protocol: str) -> None:
    with ProviderServer(protocol, responder=lambda r: f"{r.system} | {r.user.upper()}") as server:
        out = ask(protocol, make_client(protocol, server), "two words", system="Be terse.", max_tokens=7)
    assert out == {"text": "Be terse. | TWO WORDS", "finish": FINISH[protocol][0], "usage": (4, 5, 9)}
    [req] = server.requests
    assert (req.system, req.user, req.model, req.max_tokens, req.fault) == ("Be terse.", "two words",
                                                                           MODEL[protocol], 7, None)
    # Where the key travels. anthropic>=2 sends its api_key as a bearer token (older SDKs sent x-api-key).
    auth = {"openai": ("authorization", f"Bearer {KEY}"), "anthropic": ("authorization", f"Bearer {KEY}"),
            "gemini": ("x-goog-api-key", KEY)}[protocol]
    assert req.headers[auth[0]] == auth[1]
    expected_path = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
                     "gemini": "/v1/models/gemini-fake:generateContent"}[protocol]  # genai 3.x defaults to v1
    assert req.path == expected_path
    assert server.answered == 1 and server.count("two") == 1 and server.count("three") == 0


def test_openai_models_list_and_content_parts() -> None:
    with ProviderServer("openai") as server:
        client = make_client("openai", server)
        assert [m.id for m in client.models.list()] == ["fake-model"]
        r = client.chat.completions.create(model="m", messages=[
            {"role": "developer", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert r.choices[0].message.content == "echo: a\nb"
    assert (server.requests[0].system, server.requests[0].user) == ("sys", "a\nb")


def test_anthropic_system_blocks_and_gemini_api_version() -> None:
    with ProviderServer("anthropic") as server:
        make_client("anthropic", server).messages.create(
            model="c", max_tokens=5, system=[{"type": "text", "text": "s1"}, {"type": "text", "text": "s2"}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert (server.requests[0].system, server.requests[0].user) == ("s1\ns2", "hi")
    types = sdk("google.genai.types")
    with ProviderServer("gemini") as server:
        client = sdk("google.genai").Client(api_key=KEY, http_options=types.HttpOptions(
            base_url=server.url, api_version="v1beta", timeout=2000))
        assert client.models.generate_content(model="models/g", contents="hi").text == "echo: hi"
    assert server.requests[0].path == "/v1beta/models/g:generateContent"


# What each SDK raises per fault: (exception class, status code or None). Mirrors the provider_servers docstring.
RAISES: dict[tuple[str, str], tuple[str, int | None]] = {
    ("openai", "429"): ("openai.RateLimitError", 429),
    ("openai", "500"): ("openai.InternalServerError", 500),
    ("openai", "overloaded"): ("openai.InternalServerError", 503),
    ("openai", "timeout"): ("openai.APITimeoutError", None),
    ("openai", "garbage"): ("json.JSONDecodeError", None),
    ("openai", "kill"): ("openai.APIConnectionError", None),
    ("anthropic", "429"): ("anthropic.RateLimitError", 429),
    ("anthropic", "500"): ("anthropic.InternalServerError", 500),
    ("anthropic", "overloaded"): ("anthropic.OverloadedError", 529),
    ("anthropic", "timeout"): ("anthropic.APITimeoutError", None),
    ("anthropic", "garbage"): ("json.JSONDecodeError", None),
    ("anthropic", "kill"): ("anthropic.APIConnectionError", None),
    ("gemini", "429"): ("google.genai.errors.ClientError", 429),
    ("gemini", "500"): ("google.genai.errors.ServerError", 500),
    ("gemini", "overloaded"): ("google.genai.errors.ServerError", 503),
    ("gemini", "timeout"): ("httpx2.ReadTimeout", None),
    ("gemini", "garbage"): ("json.JSONDecodeError", None),
    ("gemini", "kill"): ("httpx2.TransportError", None),  # ReadError (connection reset) in practice
}


@pytest.mark.parametrize(("protocol", "fault"), list(RAISES))
def test_fault_maps_to_sdk_exception(protocol: str, fault: str) -> None:
    cls_name, status = RAISES[protocol, fault]
    with ProviderServer(protocol, faults=[fault], retry_after=0.25, hang_seconds=TIMEOUT + 1.0) as server:
        with pytest.raises(sdk(cls_name)) as info:
            ask(protocol, make_client(protocol, server), "hello")
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 1.0  # a hanging "timeout" handler doesn't hold up shutdown
    exc = info.value
    if status is not None:
        assert (exc.code if protocol == "gemini" else exc.status_code) == status
        assert exc.response.status_code == status
    if fault == "429":
        assert exc.response.headers["retry-after"] == "0.25"
    if protocol == "gemini" and status is not None:
        assert exc.status == {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}[status]
    if fault == "timeout" and protocol != "gemini":
        assert isinstance(exc, sdk(f"{protocol}.APIConnectionError"))  # catching APIConnectionError covers both
    [req] = server.requests
    assert req.fault == fault and req.user == "hello" and server.answered == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_truncated_and_recovery_on_one_client(protocol: str) -> None:
    """Faults are consumed in order on a pooled connection; the client recovers after a reset or a 429."""
    faults = ["truncated", "kill", "ok", "429", None]
    with ProviderServer(protocol, responder=lambda r: "abcdefgh", faults=faults) as server:
        client = make_client(protocol, server)
        assert ask(protocol, client, "q1") == {"text": "abcd", "finish": FINISH[protocol][1], "usage": (3, 1, 4)}
        with pytest.raises(Exception):  # noqa: B017 - class per SDK is covered above
            ask(protocol, client, "q2")
        assert ask(protocol, client, "q2")["text"] == "abcdefgh"
        with pytest.raises(Exception):  # noqa: B017
            ask(protocol, client, "q3")
        assert ask(protocol, client, "q3")["finish"] == FINISH[protocol][0]
        assert ask(protocol, client, "q4")["text"] == "abcdefgh"  # faults exhausted: answers normally
    assert [r.fault for r in server.requests] == ["truncated", "kill", None, "429", None, None]
    assert (server.count("q2"), server.count("q3"), server.count("q"), server.answered) == (2, 2, 6, 3)


def test_unknown_fault_and_route() -> None:
    with pytest.raises(ValueError, match="unknown faults"):
        ProviderServer("openai", faults=["boom"])
    with pytest.raises(ValueError, match="protocol"):
        ProviderServer("cohere")
    openai = sdk("openai")
    with ProviderServer("openai") as server, pytest.raises(openai.NotFoundError):
        make_client("openai", server).embeddings.create(model="m", input="x")
    assert server.requests == [] and server.calls == [("POST", "/v1/embeddings")]


def test_anthropic_batch_through_sdk() -> None:
    with ProviderServer("anthropic", faults=["ok", "429", "truncated"], batch_polls_before_end=2,
                        responder=lambda r: f"answer to {r.user}") as server:
        client = make_client("anthropic", server)
        batch = client.messages.batches.create(requests=[
            {"custom_id": f"item-{i}", "params": {"model": "claude-fake", "max_tokens": 16, "system": "sys",
                                                  "messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(3)])
        assert batch.processing_status == "in_progress" and batch.results_url is None
        assert batch.request_counts.processing == 3
        states = [client.messages.batches.retrieve(batch.id).processing_status for _ in range(3)]
        assert states == ["in_progress", "in_progress", "ended"]
        ended = client.messages.batches.retrieve(batch.id)
        assert (ended.request_counts.succeeded, ended.request_counts.errored) == (2, 1)
        assert ended.results_url == f"{server.url}/v1/messages/batches/{batch.id}/results"
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["item-0"].type == "succeeded"
    assert results["item-0"].message.content[0].text == "answer to question 0"
    assert results["item-0"].message.stop_reason == "end_turn"
    assert results["item-1"].type == "errored" and results["item-1"].error.error.type == "rate_limit_error"
    assert results["item-2"].message.stop_reason == "max_tokens"
    assert [(r.custom_id, r.fault, r.system) for r in server.requests] == [
        ("item-0", None, "sys"), ("item-1", "429", "sys"), ("item-2", "truncated", "sys")]
    assert server.answered == 1 and server.count("question") == 3


def test_gemini_batch_through_sdk() -> None:
    types = sdk("google.genai.types")
    with ProviderServer("gemini", faults=[None, "500"], responder=lambda r: f"answer to {r.user}") as server:
        client = make_client("gemini", server)
        src = [{"contents": [{"role": "user", "parts": [{"text": f"question {i}"}]}],
                "config": {"system_instruction": "sys", "max_output_tokens": 9}, "metadata": {"key": f"k{i}"}}
               for i in range(2)]
        job = client.batches.create(model="gemini-fake", src=src)
        assert job.name.startswith("batches/") and job.state == types.JobState.JOB_STATE_PENDING
        assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_RUNNING
        done = client.batches.get(name=job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    ok, failed = done.dest.inlined_responses
    assert ok.metadata == {"key": "k0"} and ok.response.text == "answer to question 0"
    assert ok.response.candidates[0].finish_reason == types.FinishReason.STOP
    assert failed.metadata == {"key": "k1"} and failed.error.code == 500 and failed.response is None
    assert [(r.custom_id, r.fault, r.system, r.max_tokens) for r in server.requests] == [
        ("k0", None, "sys", 9), ("k1", "500", "sys", 9)]
    assert server.calls[0] == ("POST", "/v1/models/gemini-fake:batchGenerateContent")


def test_responder_sees_request_and_threads_are_safe() -> None:
    """Concurrent clients: every request is recorded once and answered from its own content."""
    from concurrent.futures import ThreadPoolExecutor

    seen: list[Request] = []

    def responder(r: Request) -> str:
        seen.append(r)
        return r.user[::-1]

    with ProviderServer("openai", responder=responder) as server:
        client = make_client("openai", server, timeout=5)
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda i: ask("openai", client, f"msg{i:02d}")["text"], range(24)))
    assert texts == [f"msg{i:02d}"[::-1] for i in range(24)]
    assert len(server.requests) == len(seen) == server.answered == 24


def test_a_stopped_provider_server_answers_nothing_and_leaves_no_thread():
    """Before, stop() closed the listening socket only: a keep-alive connection the SDKs pool went on being
    answered by its handler thread after the server had stopped, and that thread and socket lived on until
    the client was garbage-collected."""
    before = set(threading.enumerate())
    with ProviderServer("openai") as srv:
        conn = http.client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), timeout=5)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().read() and len(srv.calls) == 1
    assert [t.name for t in set(threading.enumerate()) - before] == []
    try:
        with pytest.raises((http.client.HTTPException, OSError)):  # the pooled connection is closed
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
    finally:
        conn.close()
    assert len(srv.calls) == 1
