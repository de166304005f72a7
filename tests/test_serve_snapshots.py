"""`felix serve` serves snapshots: a splice write answers, and is seen by the completions started after it, while a
streamed chat completion started before it is still open and unread; that stream ends on the state it began with,
token for token, and the state it held is freed once it ends. Real server (the tiny model of test_splice_server),
real HTTP, a client that stops reading its stream."""

from __future__ import annotations

import gc
import json
import shutil
import socket
import urllib.request
import weakref
from pathlib import Path

import pytest
from test_serve_shutdown import wait_until
from test_splice_server import TOKEN, base_ckpt, call, running  # noqa: F401 (shared fixture)

from felix.server import FelixHTTPServer

MESSAGES = [{"role": "user", "content": "count the stones"}]  # 40 greedy tokens, which ablating 1 and 3 changes
EDIT = {"gate_biases": {"1": -1.0, "3": -1.0}}
BUFFER = 4096  # bytes of socket buffer each side of the stalled stream


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:  # noqa: F811 (the fixture's name)
    """A private copy: patches are saved beside the checkpoint."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


def chat(server: FelixHTTPServer) -> tuple[str, int]:
    """A greedy, unstreamed chat completion: its text and completion tokens."""
    status, out = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 40, "temperature": 0})
    assert status == 200, out
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]


def small_send_buffers(server: FelixHTTPServer) -> None:
    """Give every connection the server accepts a small send buffer, so a stream its client does not read
    stalls the handler after a few events (the kernel's autotuned buffers would hold a whole stream)."""
    accept = server.get_request

    def get_request() -> tuple[socket.socket, object]:
        conn, addr = accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        return conn, addr

    server.get_request = get_request  # type: ignore[method-assign]


def open_stream(server: FelixHTTPServer) -> tuple[socket.socket, bytes]:
    """A greedy streamed chat completion whose client reads the response head and the first event, then
    stops reading: (its socket, what was read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # before connecting: it sets the window
    sock.settimeout(30)
    sock.connect(server.server_address[:2])
    body = json.dumps({"messages": MESSAGES, "max_tokens": 40, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    read = b""
    while b"\n\n" not in read.partition(b"\r\n\r\n")[2]:  # a byte at a time: nothing more is taken off the wire
        read += sock.recv(1)
    return sock, read


def streamed(raw: bytes) -> tuple[str, int]:
    """The text and completion tokens of a whole SSE chat stream (response head included)."""
    head, _, events = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:200]
    text, tokens, done = "", None, False
    for event in events.decode().split("\n\n"):
        if not event:
            continue
        data = event.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            continue
        obj = json.loads(data)
        assert "error" not in obj, obj["error"]
        if obj["choices"]:
            text += obj["choices"][0]["delta"].get("content") or ""
        else:  # include_usage's last chunk
            tokens = obj["usage"]["completion_tokens"]
    assert done and tokens is not None
    return text, tokens


def test_a_write_answers_while_an_unread_stream_is_open_and_the_stream_ends_on_its_own_state(ckpt):
    with running(ckpt) as server:
        service = server.service
        service.model_id = "m" * 8192  # in every event: a few of them fill the stalled stream's buffers
        small_send_buffers(server)
        before = chat(server)
        old = weakref.ref(service.model)
        sock, read = open_stream(server)
        with sock:
            # the write must answer while the stream stalls, mid-generation, on the socket nobody reads
            req = urllib.request.Request(server.url + "/api/v1/splice/edit", data=json.dumps(EDIT).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=10) as resp:  # the old lock: blocked till the stream ended
                assert resp.status == 200 and json.load(resp)["applied"] == 2
            after = chat(server)  # a completion started after the write sees it, with the stream still open
            assert after != before
            status = service.status()
            assert {L["gate"] for L in status["layers"].values()} == {0.0}
            assert [p["method"] for p in status["patches"]] == ["gate_bias"]
            assert old() is not None and old() is not service.model  # the stalled stream still holds its state
            while chunk := sock.recv(1 << 16):
                read += chunk
        assert streamed(read) == before  # every token from the state it began on, none from the edit's
    # its state is freed once the stream has ended (it shares every weight: only SpliceCore was its own)
    wait_until(lambda: gc.collect() >= 0 and old() is None, "the old snapshot to be freed")
