"""SIGTERM (systemd stop, a scheduler, `kill`, `timeout`) takes Ctrl-C's path in every verb (`felix.cli.main`):
`felix harvest run` and `felix synth run` keep the answers in flight, ask nothing more and exit 143; `felix serve`
shuts down as on Ctrl-C and exits 0; any other verb exits 143 after its cleanup. Each against a real `felix`
subprocess. (`felix train` stops after its step: tests/test_graceful_stop.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("openai")

from provider_servers import ProviderServer, Request  # noqa: E402
from test_harvest import gold, store_rows, teacher, write_config  # noqa: E402
from test_splice_server import B1, TOKEN, base_ckpt, call, f32, running  # noqa: E402, F401 (shared fixture)
from test_synth import documents, rephrase  # noqa: E402

from felix.checkpoint import save_checkpoint  # noqa: E402
from felix.config import FelixConfig, ModelConfig, TrainConfig  # noqa: E402
from felix.errors import RunStopped  # noqa: E402
from felix.model import FelixLM  # noqa: E402
from felix.patches import PatchStack  # noqa: E402
from felix.signal_handlers import sigterm_interrupts  # noqa: E402
from felix.tokenizer import FelixTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sigterm_interrupts_only_while_the_block_runs():
    # only the main thread can set handlers: elsewhere the os.kill below would end this process
    assert threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped) as caught, sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the latest here
    assert caught.value.exit_code == 143 and str(caught.value) == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_repeated_sigterm_does_not_cut_the_cleanup_short():
    """systemd's control-group stop and a forwarding parent (torchrun) each send SIGTERM: the second, arriving
    during the cleanup the first started, raised RunStopped again and abandoned it."""
    cleaned = []
    with pytest.raises(RunStopped), sigterm_interrupts():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            signal.raise_signal(signal.SIGTERM)
            cleaned.append(True)
    assert cleaned == [True]


def held(answer, seconds: float = 1.0):
    """A responder that answers after `seconds`: long enough for the signal to land while its request is out."""

    def respond(req: Request) -> str:
        time.sleep(seconds)
        return answer(req)

    return respond


def synth_config(tmp_path: Path, url: str) -> Path:
    documents(tmp_path, n=3)
    cfg = {"store": "store.sqlite",
           "teachers": [{"name": "phraser", "provider": "openai", "model": "smol", "base_url": url + "/v1",
                         "timeout": 5, "concurrency": 2}],
           "retry": {"max_retries": 0, "max_attempts": 1, "backoff_base": 0.0},
           "synth": {"sources": ["docs.jsonl"], "min_chars": 50, "formats": ["faq"]}}
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize("verb", ["harvest", "synth"])
def test_sigterm_keeps_the_answers_in_flight_asks_nothing_more_and_exits_143(tmp_path, verb):
    """Three requests, two at a time: SIGTERM while the first two are out. Before, the process died at once
    (-15) and both answers, already paid for, were lost."""
    responder = held(gold if verb == "harvest" else rephrase)
    with ProviderServer("openai", responder=responder) as srv:
        if verb == "harvest":
            path = write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=2, timeout=5)],
                                tasks=["encoding"])
            extra = ["--limit", "3"]
        else:
            path = synth_config(tmp_path, srv.url)
            extra = []
        cmd = [sys.executable, "-m", "felix", verb, "run", "--config", str(path), "--no-progress", *extra]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while srv.count("") < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.count("") == 2, "the first two requests never arrived"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        asked = [r.user for r in srv.requests]
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"felix {verb}: stopped by SIGTERM"
    rows = store_rows(tmp_path / "store.sqlite")
    kept = {json.loads(r["request"])["user"] for r in rows if r["status"] == "ok"}
    assert kept == set(asked) and len(asked) == 2  # both answers stored; the third never asked


def test_sigterm_stops_serve_as_ctrl_c_does_and_the_spliced_state_survives(base_ckpt, tmp_path):  # noqa: F811
    """And a Ctrl-C once it has stopped changes nothing: before, one landing as the process ended killed it
    (-2) or made it exit 130."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, ckpt)
    cmd = [sys.executable, "-m", "felix", "serve", "--checkpoint", str(ckpt), "--port", "0"]
    proc = subprocess.Popen(cmd, env={**ENV, "FELIX_SERVE_TOKEN": TOKEN}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(60, proc.kill)  # a hung server still ends
    guard.start()
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, "felix serve ended before it listened"
            if line.startswith("felix serve: http://"):
                url = line.split()[2]
        server = SimpleNamespace(url=url)
        status, out = call(server, "/api/v1/splice/tensor",
                           {"name": B1, "data": f32([[0.25] * 4] * 32), "dtype": "f32"}, token=TOKEN)
        assert status == 200, out
        before = call(server, "/api/v1/splice/status")[1]
        proc.send_signal(signal.SIGTERM)
        while (line := proc.stderr.readline()) != "felix serve: stopped by SIGTERM\n":  # after the requests' log
            assert line, "felix serve ended without saying why"
        time.sleep(0.05)  # no write in flight: it has stopped, and is ending
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        guard.cancel()
        proc.kill()
    assert proc.returncode == 0, err  # as on Ctrl-C: stopping is how a server ends, not a failure
    assert not err.strip()  # nothing after the stop: no second line, no traceback
    assert len(PatchStack.open(ckpt).list()) == 1
    with running(ckpt) as server:  # restart: the pushed tensor is back
        assert call(server, "/api/v1/splice/status")[1] == before


def test_sigterm_takes_ctrl_c_path_in_every_verb(base_ckpt, tmp_path):  # noqa: F811
    """`felix generate`, which sets no handler of its own: SIGTERM mid-stream ends it as Ctrl-C would, with the
    CLI's one line and exit 143. Before, the default action killed it (-15), with no word and no cleanup."""
    vocab = FelixTokenizer.load(base_ckpt / "tokenizer.json").vocab_size
    model = ModelConfig(vocab_size=vocab, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=1 << 16)
    cfg = FelixConfig(model=model, train=TrainConfig(seq_len=32))
    ckpt = save_checkpoint(tmp_path / "run", 1, FelixLM(cfg.model), cfg, {},
                           tokenizer_path=base_ckpt / "tokenizer.json")  # room for minutes of sampling
    cmd = [sys.executable, "-m", "felix", "generate", "--checkpoint", str(ckpt), "--prompt", "a",
           "--max-new-tokens", str(1 << 15), "--temperature", "1.0"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.read(1) == "a", "generate printed nothing"  # the prompt: sampling has begun
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "felix generate: stopped by SIGTERM"
