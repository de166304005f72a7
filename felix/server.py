"""`felix serve`'s HTTP layer: the mnemonic daemon's splice API plus an OpenAI-compatible chat API.

Standard library only (`http.server.ThreadingHTTPServer`): one thread per connection, HTTP/1.0 (each
response closes its connection, which is also how SSE streams end). Request logic lives in
`felix.server_api.SpliceService`; this module does routing, bearer-token auth, body limits, JSON
parsing and error envelopes.

Routes (W = write endpoint, needs `Authorization: Bearer <token>`):
    POST /api/v1/complete            GET  /api/v1/splice/status
    POST /api/v1/splice/tensor  W    POST /api/v1/splice/edit  W    POST /api/v1/splice/rollback  W
    POST /v1/chat/completions        GET  /v1/models                GET  /v1/models/{model}

Daemon errors are `{"error": message, "code": CODE[, "errors": [...]]}`; OpenAI routes use OpenAI's
`{"error": {"message", "type", "param", "code"}}` so SDK clients raise their usual exceptions.

Stopping: `stop_accepting()` closes the listening socket and answers any request not yet started with 503
SHUTTING_DOWN; `wait_for_writes(grace)` lets the writes already admitted send their answers. Reads are not
waited for: they change nothing, so their clients can simply retry.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from felix.errors import FelixError
from felix.server_api import SpliceService
from felix.server_chat import logprobs_json
from felix.server_common import ApiError, GenResult, TokenLogprob

log = logging.getLogger("felix.server")

TOKEN_ENV = "FELIX_SERVE_TOKEN"
DEFAULT_MAX_BODY = 16 << 20
DRAIN_LIMIT = 64 << 20  # an oversized body up to this is read and discarded so the client sees the 413


def load_token(token_file: str | Path | None = None) -> str | None:
    """The write token: from `token_file` if given, else $FELIX_SERVE_TOKEN; None when neither is set."""
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise FelixError(f"{path}: cannot read the token file ({exc.strerror})") from None
        if not token:
            raise FelixError(f"{path}: the token file is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


MODEL_ROUTE = "/v1/models/{model}"


def route_path(path: str) -> tuple[str, dict[str, str]]:
    """The ROUTES path a request path takes and the parameters it holds: a model id after /v1/models/ (which
    the SDKs percent-encode, `/` included)."""
    prefix = MODEL_ROUTE.removesuffix("{model}")
    if path.startswith(prefix):
        return MODEL_ROUTE, {"model": unquote(path.removeprefix(prefix))}
    return path, {}


Route = tuple[Callable[[SpliceService, dict], Any], bool, bool]  # (handler, needs token, OpenAI style)
ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/api/v1/complete"): (SpliceService.complete, False, False),
    ("POST", "/api/v1/splice/tensor"): (SpliceService.push_tensor, True, False),
    ("POST", "/api/v1/splice/edit"): (SpliceService.edit_gates, True, False),
    ("POST", "/api/v1/splice/rollback"): (SpliceService.rollback, True, False),
    ("GET", "/api/v1/splice/status"): (lambda s, _: s.status(), False, False),
    ("GET", "/v1/models"): (lambda s, _: s.models(), False, True),
    ("GET", MODEL_ROUTE): (SpliceService.retrieve_model, False, True),  # the id reaches it as body["model"]
    ("POST", "/v1/chat/completions"): (None, False, True),  # handled by Handler._chat (may stream)
}


class FelixHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: SpliceService, token: str | None,
                 max_body: int = DEFAULT_MAX_BODY):
        if ":" in address[0]:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        # An empty token disables writes: compared as given, it would admit 'Bearer ' with no credentials.
        self.service, self.token, self.max_body = service, (token or "").strip() or None, max_body
        self._state = threading.Condition()  # guards _stopping and _writes: admission and stop are atomic
        self._stopping = False
        self._writes = 0

    def admit(self, write: bool) -> bool:
        """Whether a request may start: none once stopping began. An admitted write is in flight until
        `write_done`, which its handler calls after sending the answer."""
        with self._state:
            if self._stopping:
                return False
            if write:
                self._writes += 1
            return True

    def write_done(self) -> None:
        """A write admitted by `admit` has sent its answer (or failed to)."""
        with self._state:
            self._writes -= 1
            self._state.notify_all()

    @property
    def writes_in_flight(self) -> int:
        """Write requests admitted whose answer is not yet sent."""
        with self._state:
            return self._writes

    def stop_accepting(self) -> int:
        """Begin stopping, once `serve_forever` has returned: close the listening socket (new connections are
        refused) and refuse every request not yet started; the number of writes in flight."""
        with self._state:
            self._stopping = True
            n = self._writes
        self.socket.close()
        return n

    def wait_for_writes(self, grace: float) -> int:
        """Wait up to `grace` seconds for the writes in flight to send their answers; how many are left."""
        deadline = time.monotonic() + grace
        with self._state:
            while self._writes and (left := deadline - time.monotonic()) > 0:
                self._state.wait(min(left, 0.25))  # slices: a 2nd Ctrl-C lands even where waits are uninterruptible
            return self._writes

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: FelixHTTPServer
    protocol_version = "HTTP/1.0"
    timeout = 60  # seconds a client may stall a read or write before its thread gives up
    server_version = "felix-serve"

    # -- plumbing -------------------------------------------------------------------------------
    # Method, path and status only: never headers (the bearer token) or bodies. A request line that did
    # not parse leaves command and path unset.
    def _request_name(self) -> str:
        return f"{getattr(self, 'command', None) or '-'} {(getattr(self, 'path', None) or '-').split('?')[0]}"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.info("%s %s", self._request_name(), code)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.warning("%s: " + format, self._request_name(), *args)

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="felix"')
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError, openai: bool) -> None:
        if openai:
            body: dict[str, Any] = {"error": _openai_error(err)}
        else:
            body = {"error": err.message, "code": err.code}
        if err.errors:
            body["errors"] = err.errors
        self._send_json(err.status, body)

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "SPLICE_BAD_REQUEST", "chunked request bodies are not supported; send Content-Length")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "SPLICE_BAD_REQUEST", "bad Content-Length") from None
        if n < 0:
            raise ApiError(400, "SPLICE_BAD_REQUEST", "bad Content-Length")
        return n

    def _drain(self) -> None:
        """Discard an unread body (if small enough) so the client can read our error response."""
        try:
            n = self._content_length()
        except ApiError:
            return
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def _read_json(self) -> dict:
        n = self._content_length()
        if n > self.server.max_body:
            self._drain()
            raise ApiError(413, "SPLICE_BAD_REQUEST", f"body of {n} bytes exceeds the limit of {self.server.max_body}")
        raw = self.rfile.read(n) if n else b""
        if len(raw) != n:
            raise ApiError(400, "SPLICE_BAD_REQUEST", "body shorter than Content-Length")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # also bad UTF-8, over-long integers, deep nesting
            raise ApiError(400, "SPLICE_BAD_REQUEST", f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "SPLICE_BAD_REQUEST", "the JSON body must be an object")
        return body

    def _authorized(self) -> bool:
        token = self.server.token
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if token is None or scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110 11.1)
            return False
        return hmac.compare_digest(given.strip().encode(), token.encode())

    # -- dispatch -------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        key, params = route_path(path)
        route = ROUTES.get((self.command, key))
        write = route is not None and route[1]
        admitted = self.server.admit(write)
        try:
            self._answer(path, route, admitted, params)
        finally:
            if admitted and write:
                self.server.write_done()

    def _answer(self, path: str, route: Route | None, admitted: bool, params: dict[str, str]) -> None:
        openai = path.startswith("/v1/")
        try:
            if not admitted:
                self._drain()
                raise ApiError(503, "SHUTTING_DOWN", "the server is shutting down; retry once it is back")
            if route is None:
                self._drain()
                if any(p == route_path(path)[0] for _, p in ROUTES):
                    raise ApiError(405, "METHOD_NOT_ALLOWED", f"{self.command} is not allowed on {path}")
                raise ApiError(404, "NOT_FOUND", f"no route {path}")
            fn, needs_token, openai = route
            if needs_token and not self._authorized():
                self._drain()
                why = "write endpoints need 'Authorization: Bearer <token>'" if self.server.token else \
                    f"write endpoints are disabled: start the server with ${TOKEN_ENV} or --token-file"
                raise ApiError(401, "UNAUTHORIZED", why)
            body = (self._read_json() if self.command == "POST" else {}) | params
            if fn is None:
                self._chat(body)
            else:
                self._send_json(200, fn(self.server.service, body))
        except ApiError as err:
            self._send_error(err, openai)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client went away or stalled
            self.close_connection = True
        except Exception:  # a bug, not a bad request: log it, tell the client without internals
            log.exception("%s %s failed", self.command, path)
            self._send_error(ApiError(500, "INTERNAL_ERROR", "internal server error"), openai)

    # -- OpenAI chat ----------------------------------------------------------------------------
    def _chat(self, body: dict) -> None:
        service = self.server.service
        ids, params, stream, include_usage = service.chat_request(body)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        gen = service.generate(ids, params)
        base = {"id": cid, "created": created, "model": service.model_id}
        want_logprobs = params.top_logprobs is not None

        def logprobs(steps: list[TokenLogprob]) -> dict | None:
            return logprobs_json(service.tok, steps) if want_logprobs else None

        try:
            if not stream:
                result = next(x for x in gen if isinstance(x, GenResult))
                self._send_json(200, base | {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.stop_reason, "logprobs": logprobs(result.logprobs)}],
                    "usage": _usage(result)})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            # OpenAI's stream: usage only when stream_options.include_usage asks, in one more chunk with no
            # choices after the finish chunk (every other chunk has "usage": null)
            chunk = base | {"object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

            def send(obj: dict) -> None:
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

            def event(delta: dict, finish: str | None = None, lp: dict | None = None) -> None:
                send(chunk | {"choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

            try:
                event({"role": "assistant", "content": ""})
                for item in gen:
                    if isinstance(item, GenResult):
                        event({}, item.stop_reason)
                        if include_usage:
                            send(chunk | {"choices": [], "usage": _usage(item)})
                    else:
                        event({"content": item.text}, lp=logprobs(item.logprobs))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                raise
            except Exception as exc:  # the 200 is out: end the stream with an error event, not a 2nd response
                err = exc if isinstance(exc, ApiError) else ApiError(500, "INTERNAL_ERROR", "internal server error")
                if err.status >= 500:
                    log.exception("streamed chat completion failed")
                send({"error": _openai_error(err)})  # the SDKs raise on it
                return
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            gen.close()  # lets go of its snapshot's model even when the client went away mid-stream


def _openai_error(err: ApiError) -> dict:
    """OpenAI's error object: the SDKs read message, type, param and code."""
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {"message": err.message, "type": kind, "param": err.param, "code": err.code}


def _usage(r: GenResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def make_server(service: SpliceService, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                max_body: int = DEFAULT_MAX_BODY) -> FelixHTTPServer:
    """Bind (port 0 picks a free port; see `.url`). Call `serve_forever()`; `shutdown()` from another thread,
    then `stop_accepting()` and `wait_for_writes(grace)` to let the writes in flight answer."""
    try:
        return FelixHTTPServer((host, port), service, token, max_body)
    except OSError as exc:
        raise FelixError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
