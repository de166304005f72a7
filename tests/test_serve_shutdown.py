"""`felix serve` stops gracefully for splice writes: once stopping, new connections are refused and requests not
yet started get a 503, while the writes in flight finish and answer, for up to --shutdown-grace seconds or until
a second Ctrl-C. Real servers on the tiny model of test_splice_server, real HTTP clients; the CLI tests run
`felix serve` in this process's main thread and signal it."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from test_splice_server import TOKEN, base_ckpt, call, running  # noqa: F401 (shared fixture)
from test_trainer_lock import TAKE

import felix.server
from felix.cli import main
from felix.patch_format import SPLICES_DIR
from felix.patches import PatchStack
from felix.server import FelixHTTPServer

EDIT = {"gate_biases": {"3": -0.75}}


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:  # noqa: F811 (the fixture's name)
    """A private copy: patches are saved beside the checkpoint."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


def wait_until(cond: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def refuses_connections(server: FelixHTTPServer) -> bool:
    try:
        socket.create_connection(server.server_address[:2], timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):  # reset: it was in the backlog as the socket closed
        return True
    except TimeoutError:  # the backlog is full of earlier probes: still listening
        return False
    return False


class Client(threading.Thread):
    """One request in its own thread, and its answer."""

    def __init__(self, server: FelixHTTPServer, path: str, body: dict):
        super().__init__(daemon=True)
        self.server, self.path, self.body = server, path, body
        self.answer: tuple[int, dict] | None = None
        self.error: OSError | None = None  # a request the server dropped unanswered

    def run(self) -> None:
        try:
            # its wait spans the hold, the stop and the write itself: longer than the 30 s grace the tests give a
            # write (an edit can take tens of seconds on cores shared with other work)
            self.answer = call(self.server, self.path, self.body, token=TOKEN, timeout=120)
        except OSError as exc:  # http.client.RemoteDisconnected is a ConnectionResetError
            self.error = exc


def held_write(server: FelixHTTPServer) -> Client:
    """A gate edit sent while the test holds the service's write lock, so it stays in flight until released."""
    server.service.writing.acquire()
    client = Client(server, "/api/v1/splice/edit", EDIT)
    client.start()
    return client


# -- the server's own stop --------------------------------------------------------------------------
def test_a_write_in_flight_answers_after_stopping_began_and_the_wait_gives_up_after_the_grace(ckpt):
    with running(ckpt) as server:
        client = held_write(server)
        try:
            wait_until(lambda: server.writes_in_flight == 1, "the write to be admitted")
            server.shutdown()
            assert server.stop_accepting() == 1
            assert refuses_connections(server)
            t0 = time.monotonic()
            assert server.wait_for_writes(0.4) == 1  # still held: the wait gives up after the grace
            assert 0.4 <= time.monotonic() - t0 < 5
        finally:
            server.service.writing.release()
        assert server.wait_for_writes(30) == 0
        client.join(30)
        assert server.writes_in_flight == 0
    status, out = client.answer
    assert status == 200 and out["applied"] == 1
    assert [p.record["method"] for p in PatchStack.open(ckpt).list()] == ["gate_bias"]


def test_a_request_not_started_when_stopping_began_gets_a_503_in_its_routes_error_shape(ckpt):
    with running(ckpt) as server:
        accepted: list[tuple] = []  # the peer addresses of the connections the server has taken off its backlog
        accept = server.get_request

        def get_request() -> tuple[socket.socket, tuple]:
            conn, addr = accept()
            accepted.append(addr)
            return conn, addr

        server.get_request = get_request  # type: ignore[method-assign]
        conns = []
        for path in ("/api/v1/splice/edit", "/v1/chat/completions"):
            conn = socket.create_connection(server.server_address[:2], timeout=30)
            conns.append(conn)
            # the request line and a header, but not the blank line that ends them: accepted, not started
            conn.sendall(f"POST {path} HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n".encode())
            # accepted, not still in the backlog, which closing the listening socket would reset
            wait_until(lambda c=conn: c.getsockname() in accepted, "the server to accept the connection")
        server.shutdown()
        assert server.stop_accepting() == 0
        replies = []
        for conn in conns:
            body = json.dumps(EDIT).encode()
            conn.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            with conn, conn.makefile("rb") as f:
                head, _, payload = f.read().partition(b"\r\n\r\n")
            replies.append((head.split(b"\r\n")[0], json.loads(payload)))
        assert server.writes_in_flight == 0
    assert replies[0][0].startswith(b"HTTP/1.0 503") and replies[0][1]["code"] == "SHUTTING_DOWN"
    assert set(replies[0][1]) == {"error", "code"}  # the daemon's shape
    assert replies[1][0].startswith(b"HTTP/1.0 503")
    assert replies[1][1]["error"]["code"] == "SHUTTING_DOWN" and replies[1][1]["error"]["type"] == "server_error"
    assert PatchStack.open(ckpt).list() == []  # the refused edit changed nothing


# -- felix serve: signals -------------------------------------------------------------------------
class Stopped(NamedTuple):
    """How `serve` ended."""

    rc: int  # the exit status
    left: int  # writes still unanswered when it returned (and the process would have exited)
    returned: float  # when it returned (time.monotonic)
    client: Client  # the write held in flight
    handlers: dict[int, Any]  # SIGINT's and SIGTERM's handlers as it returned: what the process exits with


def serve(ckpt: Path, monkeypatch, grace: float,
          script: Callable[[FelixHTTPServer, Callable[[], None]], None]) -> Stopped:
    """Run `felix serve` here, in the main thread (signals reach only it), with a write held in flight; `script`
    runs beside it and signals it, and may let the write go with the function it is given (else it is let go
    once serve returned). The signals' handlers are put back afterwards."""
    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setenv(felix.server.TOKEN_ENV, TOKEN)
    made: list[FelixHTTPServer] = []
    make_server = felix.server.make_server

    def keep(*args, **kwargs) -> FelixHTTPServer:  # the real server, kept to talk to
        made.append(make_server(*args, **kwargs))
        return made[0]

    monkeypatch.setattr(felix.server, "make_server", keep)
    clients: list[Client] = []
    failed: list[BaseException] = []
    served, released = threading.Event(), threading.Event()

    def release() -> None:  # once: who let go is recorded, not read off the lock, which the server takes next
        if not released.is_set():
            released.set()
            made[0].service.writing.release()

    def side() -> None:
        try:
            wait_until(lambda: made, "the server")
            clients.append(held_write(made[0]))
            wait_until(lambda: made[0].writes_in_flight == 1, "the write to be admitted")
            script(made[0], release)
        except BaseException as exc:
            failed.append(exc)
            if made:
                made[0].shutdown()  # a failed script still ends the server
        finally:
            if clients:  # the test holds the write lock
                served.wait(60)
                release()

    thread = threading.Thread(target=side, daemon=True)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    thread.start()
    try:
        rc = main(["serve", "--checkpoint", str(ckpt), "--port", "0", "--shutdown-grace", str(grace)])
        # what was left in flight when serve returned (and the process would have exited): a write counts
        # until its answer is sent
        left, returned = made[0].writes_in_flight, time.monotonic()
        handlers = {s: signal.getsignal(s) for s in previous}
    finally:
        served.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
    thread.join(60)
    if failed:
        raise failed[0]
    clients[0].join(30)
    return Stopped(rc, left, returned, clients[0], handlers)


def kill(sig: int) -> None:
    signal.pthread_kill(threading.main_thread().ident, sig)


def test_sigterm_lets_a_write_in_flight_answer_before_serve_returns(ckpt, monkeypatch, capsys):
    """Before, serve returned at once: the process ended with the write's client unanswered."""

    def script(server: FelixHTTPServer, release: Callable[[], None]) -> None:
        kill(signal.SIGTERM)
        wait_until(lambda: refuses_connections(server), "the listening socket to close")
        time.sleep(0.3)  # serve waits now, for the write still held
        release()

    rc, left, _, client, _ = serve(ckpt, monkeypatch, 30, script)
    err = capsys.readouterr().err
    assert rc == 0 and left == 0  # answered before serve returned (and so before the process exits)
    status, out = client.answer
    assert status == 200 and out["applied"] == 1
    assert [p.record["method"] for p in PatchStack.open(ckpt).list()] == ["gate_bias"]
    assert "felix serve: stopped by SIGTERM\nfelix serve: waiting up to 30 s for 1 splice write in flight" in err
    assert "unanswered" not in err


def test_a_second_ctrl_c_stops_the_wait_at_once(ckpt, monkeypatch, capsys):
    signalled: list[float] = []

    def script(server: FelixHTTPServer, release: Callable[[], None]) -> None:
        kill(signal.SIGINT)
        wait_until(lambda: refuses_connections(server), "the listening socket to close")
        signalled.append(time.monotonic())
        kill(signal.SIGINT)

    rc, left, returned, client, _ = serve(ckpt, monkeypatch, 30, script)
    err = capsys.readouterr().err
    assert rc == 0 and returned - signalled[0] < 5 and left == 1  # not the 30 s grace
    client.join(timeout=10)
    # not applied: in a real process it dies with the process; in this one, the closed service refuses it
    assert client.error is not None or client.answer[0] == 503, client.answer
    assert "felix serve: stopped at once: 1 splice write unanswered" in err


@pytest.mark.parametrize("late", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_after_the_writes_answered_leaves_the_exit_status_0(ckpt, monkeypatch, capsys, late):
    """SIGTERM, the write answers, then `late` lands as serve cleans up (or, in a real process, as Python exits):
    before, it turned the clean stop into exit 130 or 143 (in a real process, often death by the signal)."""

    def script(server: FelixHTTPServer, release: Callable[[], None]) -> None:
        close = server.server_close

        def cleanup() -> None:  # serve's last step: a signal lands in it
            try:
                kill(late)
                time.sleep(0.2)  # a handler runs in here at the latest
            finally:
                close()

        server.server_close = cleanup  # type: ignore[method-assign]
        kill(signal.SIGTERM)
        wait_until(lambda: refuses_connections(server), "the listening socket to close")
        release()

    stopped = serve(ckpt, monkeypatch, 30, script)
    err = capsys.readouterr().err
    assert stopped.rc == 0 and stopped.left == 0, err
    assert stopped.client.answer[0] == 200
    assert err.count("stopped by SIGTERM") == 1 and "interrupted" not in err
    # and so on to the process's end: Python's exit keeps an ignored signal ignored
    assert stopped.handlers == {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}


def test_a_stopped_serve_lets_go_of_the_patch_stack(ckpt, monkeypatch):
    """Before, the lock went with the service's garbage collection: a `felix splice apply` beside a stopped
    in-process server was refused as if it still served."""

    def script(server: FelixHTTPServer, release: Callable[[], None]) -> None:
        take = [sys.executable, "-c", TAKE, str(ckpt / SPLICES_DIR)]
        assert subprocess.run(take, capture_output=True, text=True, timeout=60).returncode == 1  # serving: held
        kill(signal.SIGTERM)
        release()

    stopped = serve(ckpt, monkeypatch, 30, script)
    assert stopped.rc == 0 and stopped.client.answer[0] == 200
    take = subprocess.run([sys.executable, "-c", TAKE, str(ckpt / SPLICES_DIR)], capture_output=True, text=True,
                          timeout=60)
    assert take.returncode == 0, take.stderr


@pytest.mark.parametrize("grace", ["nan", "inf", "-1"])
def test_shutdown_grace_must_be_finite_and_not_negative(ckpt, grace, capsys):
    assert main(["serve", "--checkpoint", str(ckpt), f"--shutdown-grace={grace}"]) == 2
    assert f"--shutdown-grace must be a finite number of seconds >= 0, got {float(grace)}" in capsys.readouterr().err


def test_ctrl_c_says_it_stopped_the_server_as_sigterm_does(ckpt, monkeypatch, capsys):
    """Before, SIGTERM's stop said "stopped by SIGTERM" and Ctrl-C's nothing (a ^C shows only on a terminal)."""

    def script(server: FelixHTTPServer, release: Callable[[], None]) -> None:
        kill(signal.SIGINT)
        wait_until(lambda: refuses_connections(server), "the listening socket to close")
        release()

    stopped = serve(ckpt, monkeypatch, 30, script)
    err = capsys.readouterr().err
    assert stopped.rc == 0 and stopped.left == 0
    assert stopped.client.answer is not None, (stopped.client.error, stopped.client.is_alive())
    assert stopped.client.answer[0] == 200
    assert "felix serve: stopped by SIGINT\nfelix serve: waiting up to 30 s for 1 splice write in flight" in err
