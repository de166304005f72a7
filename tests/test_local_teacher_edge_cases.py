"""Edge cases of the offline teacher's server start-up and of the deployment CLI verbs: a picked port that another
process takes before the server binds it, and a sampling seed that does not fit the generator."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_local_teacher import alive, skip_without_llama_server

from felix import local_teacher
from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import FelixConfig, ModelConfig, TrainConfig
from felix.local_teacher import LlamaCppServer, port_is_free
from felix.model import FelixLM
from felix.tokenizer import train_tokenizer


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port bound by another socket (not listening: a probe is refused at once, as before a server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.slow
def test_start_retries_on_another_port_when_the_picked_one_is_taken_first(tmp_path, monkeypatch, smollm2_path,
                                                                          taken_port):
    # free_port() only says a port is free now; the server binds it after loading the model, seconds later. A port
    # taken in between (another test worker's connection or server) made start() fail with uvicorn's "address
    # already in use" instead of trying another port.
    skip_without_llama_server()
    picks = iter([taken_port])
    real_free_port = local_teacher.free_port
    monkeypatch.setattr(local_teacher, "free_port", lambda host="127.0.0.1": next(picks, None) or real_free_port(host))
    log = tmp_path / "server.log"
    with LlamaCppServer(smollm2_path, log_path=log, n_ctx=256, startup_timeout=60) as server:
        assert server.running and server.port != taken_port and not port_is_free(server.port)
        pid = server.process.pid
    assert not alive(pid)
    assert f"port {taken_port}" in log.read_text(errors="replace")  # the log says why the server started twice


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A random-init checkpoint of a tiny FelixLM with its tokenizer."""
    root = tmp_path_factory.mktemp("seed_ckpt")
    (root / "src.jsonl").write_text(json.dumps({"text": "some words and more words, " * 50}) + "\n", encoding="utf-8")
    tok = train_tokenizer([root / "src.jsonl"], 300, root / "tokenizer.json")
    model = ModelConfig(vocab_size=300, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=24)
    cfg = FelixConfig(model=model, train=TrainConfig(seq_len=16))
    save_checkpoint(root / "run", 1, FelixLM(model), cfg, {}, tokenizer_path=tok.path)
    return root / "run"


@pytest.mark.parametrize("seed", ["18446744073709551616", "-9223372036854775809"])
def test_generate_seed_out_of_the_generators_range_is_a_flag_error(run_dir, capsys, seed):
    # torch seeds are 64-bit: a larger one raised ValueError ("Overflow when unpacking long long") out of the
    # command, a traceback and exit 1, after the model had loaded
    rc = main(["generate", "--checkpoint", str(run_dir), "--prompt", "some", "--seed", seed, "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "--seed" in err and seed in err
    # the range's ends still sample
    for edge in ("18446744073709551615", "-9223372036854775808"):
        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "some", "--max-new-tokens", "2",
                     "--seed", edge, "--json"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"] == 2
