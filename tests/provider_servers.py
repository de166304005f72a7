"""Fake LLM provider servers that the official Python SDKs talk to unchanged (point them at ``server.url``).

One ``ProviderServer`` speaks one wire protocol on 127.0.0.1 (random port) from a daemon thread:

* ``"openai"``: ``POST /v1/chat/completions``, ``GET /v1/models``.
  Client: ``openai.OpenAI(base_url=server.url + "/v1", api_key=..., max_retries=0, timeout=...)``.
* ``"anthropic"``: ``POST /v1/messages`` and Message Batches (``POST /v1/messages/batches``,
  ``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches/{id}/results``).
  Client: ``anthropic.Anthropic(base_url=server.url, api_key=..., max_retries=0, timeout=...)``.
* ``"gemini"``: ``POST /{v1,v1beta,v1alpha}/models/{model}:generateContent`` and the Batch API with inlined
  requests (``POST .../models/{model}:batchGenerateContent``, ``GET .../batches/{id}``).
  Client: ``genai.Client(api_key=..., http_options=types.HttpOptions(base_url=server.url, timeout=ms))``.

What a test reads back: ``server.requests`` (one ``Request`` per completion, batch items included, faulted ones
too, with the parsed ``system``/``user``/``model``/``max_tokens`` and lower-cased headers), ``server.calls``
((method, path) of every HTTP request, polls included), ``server.answered`` (completions answered without a fault)
and ``server.count(text)`` (completions whose user message contains ``text``). The default responder answers
``"echo: <user>"``; usage counts whitespace-separated words.

Scripted ``faults`` are consumed one per completion request (each batch item counts as one), in order;
``None``/``"ok"`` answers normally. In a batch, "truncated" truncates the item and every other fault makes the
item fail (Anthropic ``errored`` result, Gemini inlined ``error``). "401" answers the provider's authentication
error (a permanent failure: the harvest must not retry it).

What each SDK raises per fault (openai 3.57, anthropic 2.15, google-genai 3.6.1, all on the ``httpx2`` transport;
tests/test_provider_servers.py re-checks every line, so an SDK upgrade that changes one fails a test):

openai (``max_retries=0``)
    "429"         ``openai.RateLimitError``: ``.status_code`` 429, ``.response.headers["retry-after"]``
    "500"         ``openai.InternalServerError``: ``.status_code`` 500
    "overloaded"  ``openai.InternalServerError``: ``.status_code`` 503
    "timeout"     ``openai.APITimeoutError`` (a subclass of ``openai.APIConnectionError``)
    "truncated"   no error; ``choices[0].finish_reason == "length"``
    "garbage"     ``json.JSONDecodeError``, unwrapped (not an ``openai.APIError``!)
    "kill"        ``openai.APIConnectionError`` (``__cause__`` is ``httpx2.ReadError``)
anthropic (``max_retries=0``)
    "429"         ``anthropic.RateLimitError``: ``.status_code`` 429, ``.response.headers["retry-after"]``
    "500"         ``anthropic.InternalServerError``: ``.status_code`` 500
    "overloaded"  ``anthropic.OverloadedError`` (subclass of ``InternalServerError``): ``.status_code`` 529
    "timeout"     ``anthropic.APITimeoutError`` (a subclass of ``anthropic.APIConnectionError``)
    "truncated"   no error; ``stop_reason == "max_tokens"``
    "garbage"     ``json.JSONDecodeError``, unwrapped
    "kill"        ``anthropic.APIConnectionError``
google.genai (no retries unless ``HttpOptions(retry_options=...)`` is given)
    "429"         ``google.genai.errors.ClientError``: ``.code`` 429, ``.status`` "RESOURCE_EXHAUSTED",
                  ``.response.headers["retry-after"]`` (``.response`` is the ``httpx2.Response``)
    "500"         ``google.genai.errors.ServerError``: ``.code`` 500, ``.status`` "INTERNAL"
    "overloaded"  ``google.genai.errors.ServerError``: ``.code`` 503, ``.status`` "UNAVAILABLE"
    "timeout"     ``httpx2.ReadTimeout`` (a ``httpx2.TimeoutException``), unwrapped
    "truncated"   no error; ``candidates[0].finish_reason == types.FinishReason.MAX_TOKENS``
    "garbage"     ``json.JSONDecodeError``, unwrapped
    "kill"        ``httpx2.ReadError`` (a ``httpx2.TransportError``), unwrapped
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from provider_wire import (
    FAULT_STATUS,
    FAULTS,
    PROTOCOLS,
    RENDER,
    Request,
    echo,
    error_body,
    parse_anthropic,
    parse_gemini,
    parse_openai,
    utc_now,
)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, like the real APIs: the SDKs pool connections, so a "kill" hits a reused socket too.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle would delay the second by 40 ms
    server: _HTTPServer

    def do_GET(self) -> None:
        self.server.owner._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.owner._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: keep pytest output quiet."""

    def read_json(self) -> dict:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw.strip() else {}

    def reply(self, status: int, payload: Any = None, *, raw: bytes | None = None,
              headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client already gave up (e.g. after its timeout): nothing to answer
            self.close_connection = True

    def kill(self) -> None:
        """Drop the connection with a TCP RST and no response, as a crashed upstream or proxy would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            # Linger 0 turns close() into a reset; rfile holds a reference to the socket, so close it first.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging "timeout" handler must not keep the test process alive

    def __init__(self, owner: ProviderServer) -> None:
        self.owner = owner
        self._connections: dict[socket.socket, threading.Thread] = {}  # open connections and their handlers
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """ThreadingMixIn's, recording the connection and its handler thread."""
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  daemon=self.daemon_threads)
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self, timeout: float) -> None:
        """End the keep-alive connections still open and wait for their handlers: else a client's pooled
        connection is still answered after the server stopped, and its thread and socket live on until the
        client is garbage-collected."""
        with self._connections_lock:
            open_now = dict(self._connections)
        for conn in open_now:
            with contextlib.suppress(OSError):  # closed already (a "kill")
                conn.shutdown(socket.SHUT_RDWR)  # the handler's read sees EOF and it returns
        deadline = time.monotonic() + timeout
        for thread in open_now.values():
            thread.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    name: str  # Anthropic "msgbatch_...", Gemini "batches/..."
    created_at: str
    results: list[dict]  # per item: Anthropic result lines or Gemini inlined responses
    polls: int = 0
    ended_at: str | None = None
    extra: dict = field(default_factory=dict)


class ProviderServer:
    """A fake provider endpoint; ``with ProviderServer("openai") as server: ... server.url ...``."""

    def __init__(self, protocol: str, responder: Callable[[Request], str] | None = None,
                 faults: list[str | None] | None = None, retry_after: float = 0.05, hang_seconds: float = 5.0,
                 batch_polls_before_end: int = 1) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        unknown = [f for f in faults or [] if f is not None and f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        self.protocol = protocol
        self.responder = responder or echo
        self.faults: list[str | None] = list(faults or [])
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.batch_polls_before_end = batch_polls_before_end
        self.requests: list[Request] = []  # completion requests (and batch items), faulted ones included
        self.calls: list[tuple[str, str]] = []  # (method, path) of every HTTP request, polls included
        self.answered = 0  # completions answered normally (no fault)
        self.url = ""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._batches: dict[str, _Batch] = {}
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> ProviderServer:
        self._httpd = _HTTPServer(self)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.protocol}-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes "timeout" handlers so they don't outlive the server
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections(timeout=5)
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries for tests ----------------------------------------------------------------------------------------

    def count(self, user_substring: str) -> int:
        """How many completion requests (faulted ones included) had this text in their user message."""
        with self._lock:
            return sum(user_substring in r.user for r in self.requests)

    # -- internals ------------------------------------------------------------------------------------------------

    def _next_fault(self) -> str | None:
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        return None if fault == "ok" else fault

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _error(self, h: _Handler, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        h.reply(status, error_body(self.protocol, status, message), headers=headers)

    def _handle(self, h: _Handler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.calls.append((method, path))
        try:
            body = h.read_json() if method == "POST" else {}
        except ValueError:
            self._error(h, 400, "request body is not valid JSON")
            return
        route = getattr(self, f"_{self.protocol}_route")
        if not route(h, method, path, body):
            self._error(h, 404, f"no route for {method} {path} in the fake {self.protocol} server")

    def _make_request(self, h: _Handler, path: str, body: dict, parsed: tuple[str, str, str, int | None],
                      custom_id: str | None = None) -> Request:
        system, user, model, max_tokens = parsed
        headers = {k.lower(): v for k, v in h.headers.items()}
        return Request(path, headers, body, system, user, model, max_tokens, custom_id=custom_id)

    def _answer(self, req: Request) -> tuple[str, bool]:
        """The responder's text (halved when truncated) and whether it was truncated; counts normal answers."""
        text = self.responder(req)
        if req.fault == "truncated":
            return text[: len(text) // 2], True
        if req.fault is None:
            with self._lock:
                self.answered += 1
        return text, False

    def _complete(self, h: _Handler, req: Request) -> None:
        """Answer one synchronous completion request, applying the next scripted fault."""
        req.fault = self._next_fault()
        self._record(req)
        fault = req.fault
        if fault == "kill":
            h.kill()
            return
        # Sleep on the stop event so shutdown isn't held up; the client has long gone when we wake up.
        if fault == "timeout" and self._stopping.wait(self.hang_seconds):
            h.kill()
            return
        if fault in FAULT_STATUS:
            status = FAULT_STATUS[fault]
            if fault == "overloaded" and self.protocol == "anthropic":
                status = 529
            headers = {"retry-after": f"{self.retry_after:g}"} if fault == "429" else None
            self._error(h, status, f"scripted fault {fault}", headers)
            return
        text, truncated = self._answer(req)
        payload = RENDER[self.protocol](req, text, truncated, next(self._ids))
        if fault == "garbage":
            data = json.dumps(payload).encode()
            h.reply(200, raw=data[: len(data) // 2])  # cut-off JSON: valid start, no end
            return
        h.reply(200, payload, headers=self._response_headers())

    def _response_headers(self) -> dict[str, str]:
        n = next(self._ids)
        if self.protocol == "openai":
            return {"x-request-id": f"req_{n}"}
        if self.protocol == "anthropic":
            return {"request-id": f"req_{n:08d}"}
        return {}

    # -- OpenAI ---------------------------------------------------------------------------------------------------

    def _openai_route(self, h: _Handler, method: str, path: str, body: dict) -> bool:
        if method == "POST" and path == "/v1/chat/completions":
            self._complete(h, self._make_request(h, path, body, parse_openai(body)))
        elif method == "GET" and path == "/v1/models":
            h.reply(200, {"object": "list", "data": [
                {"id": "fake-model", "object": "model", "created": 0, "owned_by": "felix-tests"}]})
        else:
            return False
        return True

    # -- Anthropic ------------------------------------------------------------------------------------------------

    def _anthropic_route(self, h: _Handler, method: str, path: str, body: dict) -> bool:
        if method == "POST" and path == "/v1/messages":
            self._complete(h, self._make_request(h, path, body, parse_anthropic(body)))
        elif method == "POST" and path == "/v1/messages/batches":
            self._anthropic_batch_create(h, path, body)
        elif method == "GET" and (m := re.fullmatch(r"/v1/messages/batches/([^/]+)", path)):
            self._anthropic_batch_get(h, m[1])
        elif method == "GET" and (m := re.fullmatch(r"/v1/messages/batches/([^/]+)/results", path)):
            self._anthropic_batch_results(h, m[1])
        else:
            return False
        return True

    def _batch_item(self, req: Request) -> tuple[int, dict]:
        """Run one batch item: (200, response) or (error status, error object). Faults other than "truncated"
        make the item fail (429 for "429", else 500): a batch item has no HTTP exchange to hang or cut."""
        req.fault = self._next_fault()
        self._record(req)
        if req.fault not in (None, "truncated"):
            status = 429 if req.fault == "429" else 500
            return status, error_body(self.protocol, status, f"scripted fault {req.fault}")
        text, truncated = self._answer(req)
        return 200, RENDER[self.protocol](req, text, truncated, next(self._ids))

    def _poll(self, batch: _Batch) -> None:
        """Count a status poll: the batch ends on the poll after ``batch_polls_before_end`` polls."""
        with self._lock:
            batch.polls += 1
            if batch.polls > self.batch_polls_before_end and batch.ended_at is None:
                batch.ended_at = utc_now()

    def _anthropic_batch_create(self, h: _Handler, path: str, body: dict) -> None:
        batch = _Batch(f"msgbatch_{next(self._ids):08d}", utc_now(), [])
        for item in body.get("requests", []):
            params = item.get("params", {})
            req = self._make_request(h, path, params, parse_anthropic(params), custom_id=item.get("custom_id"))
            status, message = self._batch_item(req)
            result = ({"type": "succeeded", "message": message} if status == 200 else
                      {"type": "errored", "error": message})
            batch.results.append({"custom_id": req.custom_id, "result": result})
        with self._lock:
            self._batches[batch.name] = batch
        h.reply(200, self._anthropic_batch_json(batch))

    def _anthropic_batch_json(self, batch: _Batch) -> dict:
        ended = batch.ended_at is not None
        kinds = [r["result"]["type"] for r in batch.results]
        return {
            "id": batch.name,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {"processing": 0 if ended else len(kinds),
                               "succeeded": kinds.count("succeeded") if ended else 0,
                               "errored": kinds.count("errored") if ended else 0,
                               "canceled": 0, "expired": 0},
            "created_at": batch.created_at,
            "expires_at": (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z"),
            "ended_at": batch.ended_at,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.url}/v1/messages/batches/{batch.name}/results" if ended else None,
        }

    def _anthropic_batch_get(self, h: _Handler, batch_id: str) -> None:
        batch = self._batches.get(batch_id)
        if batch is None:
            self._error(h, 404, f"batch {batch_id} not found")
            return
        self._poll(batch)
        h.reply(200, self._anthropic_batch_json(batch))

    def _anthropic_batch_results(self, h: _Handler, batch_id: str) -> None:
        batch = self._batches.get(batch_id)
        if batch is None or batch.ended_at is None:
            self._error(h, 404, f"batch {batch_id} not found or not ended")
            return
        lines = "".join(json.dumps(r) + "\n" for r in batch.results)
        h.reply(200, raw=lines.encode(), content_type="application/binary")

    # -- Gemini ---------------------------------------------------------------------------------------------------

    def _gemini_route(self, h: _Handler, method: str, path: str, body: dict) -> bool:
        if method == "POST" and (m := re.fullmatch(r"/v1(?:beta|alpha)?/models/([^/:]+):generateContent", path)):
            self._complete(h, self._make_request(h, path, body, parse_gemini(body, m[1])))
        elif method == "POST" and (
                m := re.fullmatch(r"/v1(?:beta|alpha)?/models/([^/:]+):batchGenerateContent", path)):
            self._gemini_batch_create(h, path, body, m[1])
        elif method == "GET" and (m := re.fullmatch(r"/v1(?:beta|alpha)?/(batches/[^/:]+)", path)):
            self._gemini_batch_get(h, m[1])
        else:
            return False
        return True

    def _gemini_batch_create(self, h: _Handler, path: str, body: dict, model: str) -> None:
        batch_body = body.get("batch", {})
        items = batch_body.get("inputConfig", {}).get("requests", {}).get("requests", [])
        batch = _Batch(f"batches/fake{next(self._ids):08d}", utc_now(), [],
                       extra={"model": f"models/{model}", "displayName": batch_body.get("displayName", "")})
        for i, item in enumerate(items):
            params, metadata = item.get("request", {}), item.get("metadata")
            custom_id = (metadata or {}).get("key", str(i))
            req = self._make_request(h, path, params, parse_gemini(params, model), custom_id=custom_id)
            status, response = self._batch_item(req)
            result: dict[str, Any] = {"response": response} if status == 200 else response  # {"error": {...}}
            if metadata is not None:
                result["metadata"] = metadata
            batch.results.append(result)
        with self._lock:
            self._batches[batch.name] = batch
        h.reply(200, self._gemini_batch_json(batch))

    def _gemini_batch_json(self, batch: _Batch) -> dict:
        """The batch as a long-running Operation, which is what the Gemini Batch API returns for create and get."""
        ended = batch.ended_at is not None
        failed = sum("error" in r for r in batch.results)
        state = "SUCCEEDED" if ended else "RUNNING" if batch.polls else "PENDING"
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "model": batch.extra["model"],
            "displayName": batch.extra["displayName"],
            "state": f"BATCH_STATE_{state}",
            "createTime": batch.created_at,
            "updateTime": batch.ended_at or batch.created_at,
            "batchStats": {"requestCount": str(len(batch.results)),
                           "successfulRequestCount": str(len(batch.results) - failed if ended else 0),
                           "failedRequestCount": str(failed if ended else 0),
                           "pendingRequestCount": str(0 if ended else len(batch.results))},
        }
        if ended:
            metadata["endTime"] = batch.ended_at
            metadata["output"] = {"inlinedResponses": {"inlinedResponses": batch.results}}
        return {"name": batch.name, "metadata": metadata, "done": ended}

    def _gemini_batch_get(self, h: _Handler, name: str) -> None:
        batch = self._batches.get(name)
        if batch is None:
            self._error(h, 404, f"{name} not found")
            return
        self._poll(batch)
        h.reply(200, self._gemini_batch_json(batch))
