"""Harvest: the real SDK clients against local servers that speak each provider's wire protocol.

The servers (tests/provider_servers.py) answer task prompts with the shipped gold references, and
inject the faults a real provider shows: 429 with retry-after, 5xx, timeouts, truncation, bodies that
are not JSON, dropped connections, schema-invalid answers.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from provider_servers import ProviderServer, Request  # noqa: E402

from felix.cli import main as felix_main  # noqa: E402
from felix.errors import FelixError  # noqa: E402
from felix.harvest import load_items, run_harvest  # noqa: E402
from felix.harvest_config import RetryConfig, load_harvest_config  # noqa: E402
from felix.harvest_store import HarvestStore  # noqa: E402
from felix.tasks.suite import corrupt, load_set, render_prompt  # noqa: E402
from felix.teacher_request import RateLimiter, backoff_delay  # noqa: E402

DEV = load_set("dev")
GOLD = {render_prompt(it)[1]: it for it in DEV}
KEY_ENV, CANARY = "FELIX_TEST_TEACHER_KEY", "sk-canary-7f3a9c1e5b"


def gold(req: Request) -> str:
    """The shipped reference for the item whose prompt this is."""
    return json.dumps(GOLD[req.user]["reference"])


def schema_invalid(req: Request) -> str:
    ref = dict(GOLD[req.user]["reference"])
    if "salience" in ref:
        ref["salience"] = 7
    else:
        ref = {"nothing": "useful"}
    return json.dumps(ref)


def write_config(tmp_path: Path, teachers: list[dict], items: list | None = None, **extra) -> Path:
    cfg = {"store": "store.sqlite", "teachers": teachers,
           "items": items if items is not None else [{"set": "dev"}],
           "retry": {"max_retries": 4, "max_attempts": 3, "backoff_base": 0.0, "backoff_max": 0.01}, **extra}
    path = tmp_path / "harvest.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def teacher(name: str, provider: str, url: str, **kw) -> dict:
    base = url + "/v1" if provider == "openai" else url
    return {"name": name, "provider": provider, "model": f"{name}-model", "base_url": base, "timeout": 0.5,
            "price": {"input": 1.0, "output": 2.0}, "concurrency": 3, **kw}


def store_rows(path: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    rows = db.execute("SELECT * FROM requests").fetchall()
    db.close()
    return rows


def ok_count(store: Path) -> int:
    """Answered requests in a store another process is writing (0 until it has created the schema)."""
    try:
        return sum(r["status"] == "ok" for r in store_rows(store))
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_harvest_each_provider_then_rerun_pays_nothing(tmp_path, provider):
    with ProviderServer(provider, responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", provider, srv.url)]))
        first = run_harvest(cfg, progress=False)
        asked = len(srv.requests)
        again = run_harvest(cfg, progress=False)
    assert first["run"]["ok"] == len(DEV) and asked == len(DEV)
    assert again["run"]["owed"] == 0 and len(srv.requests) == asked  # nothing asked twice
    t = first["totals"][f"{provider}:t1-model"]
    assert t["ok"] == len(DEV) and t["gate_passed"] == len(DEV)
    words = sum(len((r.system + " " + r.user).split()) for r in srv.requests)
    assert t["input_tokens"] >= words * 0.5 and t["cost_usd"] == pytest.approx(
        (t["input_tokens"] * 1.0 + t["output_tokens"] * 2.0) / 1e6)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_faults_are_retried_and_nothing_is_lost(tmp_path, provider):
    faults = ["429", "500", "timeout", "truncated", "garbage", "kill", "429", "truncated"]
    with ProviderServer(provider, responder=gold, faults=faults, retry_after=0.05, hang_seconds=1.5) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", provider, srv.url, concurrency=1)]))
        result = run_harvest(cfg, progress=False)
    assert result["totals"][f"{provider}:t1-model"]["ok"] == len(DEV)
    assert result["run"]["malformed"] == 2  # the two truncated answers were paid and asked again
    rows = store_rows(cfg.store_path)
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(r["attempts"] for r in rows if r["attempts"] > 1) == [2, 2]
    answered = [r for r in srv.requests if r.fault in (None, "ok")]
    assert len({r.user for r in answered}) == len(answered) == len(DEV)  # no good answer was bought twice


def test_retry_after_is_honoured_and_backoff_is_jittered(tmp_path):
    delays: list[float] = []
    with ProviderServer("openai", responder=gold, faults=["429"], retry_after=0.25) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1)],
                                               items=[{"set": "dev"}], tasks=["encoding"]))
        from felix.harvest import judge_task, task_job
        from felix.harvest_runner import Harvester

        with HarvestStore(cfg.store_path) as store:
            h = Harvester(cfg, store, judge_task, progress=False, sleep=delays.append)
            h.run([task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:2]])
    assert delays == [pytest.approx(0.25)]
    policy = RetryConfig(backoff_base=1.0, backoff_max=8.0)
    rng = random.Random(0)
    draws = [backoff_delay(r, policy, None, rng) for r in range(6) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in draws) and len(set(draws)) > 100
    assert max(backoff_delay(0, policy, None, rng) for _ in range(100)) <= 1.0


def test_malformed_answers_give_up_after_the_limit_and_retry_failed_asks_again(tmp_path):
    with ProviderServer("openai", responder=schema_invalid) as srv:
        path = write_config(tmp_path, [teacher("t1", "openai", srv.url)], tasks=["encoding"])
        cfg = load_harvest_config(path)
        first = run_harvest(cfg, progress=False)
        n_items = first["items"]
        assert len(srv.requests) == 3 * n_items  # max_attempts each
        rows = store_rows(cfg.store_path)
        assert {r["status"] for r in rows} == {"gave_up"}
        assert all("salience_out_of_range" in r["reason"] for r in rows)
        t = first["totals"]["openai:t1-model"]
        assert t["paid_attempts"] == 3 * n_items and t["cost_usd"] > 0  # malformed answers are still paid for
        assert run_harvest(cfg, progress=False)["run"]["owed"] == 0
        srv.responder = gold
        again = run_harvest(cfg, retry_failed=True, progress=False)
    assert again["reset"] == n_items and again["run"]["ok"] == n_items
    # --retry-failed restarts the attempt count, not the count of what was paid
    assert again["totals"]["openai:t1-model"]["paid_attempts"] == 4 * n_items == len(srv.requests)


def test_permanent_errors_are_not_retried(tmp_path):
    """A refusal of the request (400) gives it up; a refusal of the teacher (401) is test_teacher_breaker's."""
    with ProviderServer("anthropic", responder=gold) as srv:
        t = teacher("t1", "anthropic", srv.url, model="t1-model")
        cfg = load_harvest_config(write_config(tmp_path, [t], tasks=["encoding"]))
        srv.faults.extend(["400"] * 100)
        result = run_harvest(cfg, progress=False, limit=2)
    assert result["run"]["failed"] == 2 and len(srv.requests) == 2 and result["run"]["stopped_teachers"] == {}
    assert {r["status"] for r in store_rows(cfg.store_path)} == {"gave_up"}


def test_anthropic_batches_resume_without_resubmitting(tmp_path):
    with ProviderServer("anthropic", responder=gold, batch_polls_before_end=3) as srv:
        path = write_config(tmp_path, [teacher("b1", "anthropic", srv.url, mode="batch", batch_poll_seconds=0.01)],
                            tasks=["principle_abstraction"])
        cfg = load_harvest_config(path)
        from felix.harvest import task_job

        # A run that submitted its batch and died before collecting it.
        from felix.teachers import make_teacher

        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)]
        with HarvestStore(cfg.store_path) as store:
            for j in jobs:
                store.add(j)
            batch_id = make_teacher(cfg.teachers[0]).submit_batch({j.key: (j.system, j.user) for j in jobs})
            store.add_batch(batch_id, cfg.teachers[0].identity, [j.key for j in jobs])
        result = run_harvest(cfg, progress=False)
        asked = [r.custom_id for r in srv.requests]
    assert sorted(asked) == sorted(j.key for j in jobs)  # polled and collected, never resubmitted
    assert result["totals"]["anthropic:b1-model"]["ok"] == len(jobs)


def test_api_keys_never_reach_store_logs_or_exports(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, CANARY)
    with ProviderServer("openai", responder=gold, faults=["429", "500", "401"]) as srv, \
            ProviderServer("gemini", responder=schema_invalid) as srv2:
        path = write_config(tmp_path, [teacher("t1", "openai", srv.url, api_key_env=KEY_ENV),
                                       teacher("t2", "gemini", srv2.url, api_key_env=KEY_ENV)])
        assert felix_main(["harvest", "--config", str(path)]) == 0
        assert felix_main(["harvest", "export", "--config", str(path), "--out", str(tmp_path / "out"),
                           "--include-failing"]) == 0
        assert felix_main(["harvest", "diff", "--config", str(path), "--json"]) == 0
    assert srv.requests[0].headers.get("authorization") == f"Bearer {CANARY}"  # the key was really used
    assert srv2.requests[0].headers.get("x-goog-api-key") == CANARY
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f


def test_missing_key_variable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = write_config(tmp_path, [teacher("t1", "openai", "http://127.0.0.1:9", api_key_env=KEY_ENV)])
    with pytest.raises(FelixError, match=f"teacher t1: environment variable {KEY_ENV} is not set"):
        run_harvest(load_harvest_config(path), progress=False)


@pytest.mark.parametrize("edit, message", [
    ({"teachers": []}, "at least one teacher"),
    ({"items": [{"set": "test"}]}, "items.0.set"),
    ({"items": [{"set": "dev", "file": "x.jsonl"}]}, "exactly one of set, file, simulate"),
    ({"tasks": ["haiku"]}, "unknown tasks"),
    ({"teachers": [{"name": "a", "provider": "openai", "model": "m", "mode": "batch"}]}, "mode: batch needs"),
    ({"teachers": [{"name": "a", "provider": "cohere", "model": "m"}]}, "teachers.0.provider"),
    ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
    ({"teachers": [{"name": "a", "provider": "openai", "model": "m", "base_url": "http://a"},
                   {"name": "b", "provider": "openai", "model": "m", "base_url": "http://b"}]},
     "teachers.1.model: teachers 'a' and 'b' are both 'openai:m'"),
])
def test_config_errors_name_the_field(tmp_path, edit, message):
    path = write_config(tmp_path, [teacher("t1", "openai", "http://127.0.0.1:9")])
    raw = {**yaml.safe_load(path.read_text()), **edit}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(FelixError, match=message) as info:
        load_harvest_config(path)
    assert str(path) in str(info.value)


def test_items_from_file_and_simulation(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "x1", "task": "encoding", "input": "flaky test_io again"}) + "\n"
                     + json.dumps({"id": "x2", "task": "poetry", "input": "..."}) + "\n")
    path = write_config(tmp_path, [teacher("t1", "openai", "http://127.0.0.1:9")], items=[{"file": "items.jsonl"}])
    with pytest.raises(FelixError, match=r"items.jsonl:2: unknown task 'poetry'"):
        load_items(load_harvest_config(path))
    path = write_config(tmp_path, [teacher("t1", "openai", "http://127.0.0.1:9")],
                        items=[{"simulate": {"seed": 5, "per_category": 1}}])
    sim = load_items(load_harvest_config(path))
    assert len(sim) == 4 * 6 and len({it["id"] for it in sim}) == len(sim)  # twins come in pairs
    assert not {it["id"] for it in sim} & {it["id"] for it in DEV}


def test_export_keeps_gate_passing_answers_and_diff_compares_teachers(tmp_path, capsys):
    def half_wrong(req: Request) -> str:
        item = GOLD[req.user]
        bad = corrupt(item, "fabricate_person") if item["task"] == "principle_abstraction" else None
        return json.dumps(bad or item["reference"])  # a fabricated person: well-formed, fails the gate's L2

    with ProviderServer("openai", responder=gold) as a, ProviderServer("anthropic", responder=half_wrong) as b:
        path = write_config(tmp_path, [teacher("good", "openai", a.url), teacher("meh", "anthropic", b.url)])
        assert felix_main(["harvest", "--config", str(path), "--json"]) == 0
        capsys.readouterr()
        out = tmp_path / "export"
        assert felix_main(["harvest", "export", "--config", str(path), "--out", str(out), "--json"]) == 0
        exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert felix_main(["harvest", "diff", "--config", str(path), "--json"]) == 0
        diff = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fabricated = sum(1 for it in DEV if it["task"] == "principle_abstraction" and corrupt(it, "fabricate_person"))
    assert fabricated > 0 and exported["skipped_failing"] == fabricated
    assert exported["written"] == 2 * len(DEV) - fabricated
    rec = json.loads((out / "encoding" / "openai_good-model.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert json.loads(rec["messages"][2]["content"]) == next(it["reference"] for it in DEV if it["id"] == rec["id"])
    good, meh = diff["teachers"]["openai:good-model"], diff["teachers"]["anthropic:meh-model"]
    assert good["gate_pass_rate"] == 1.0 and meh["gate_pass_rate"] == pytest.approx(1 - fabricated / len(DEV), 1e-3)
    (pair,) = diff["pairs"]
    assert pair["shared"] == len(DEV) and pair["decision_agreement"] == 1.0 and pair["mean_word_overlap"] < 1.0


def test_rate_limiter_spaces_requests_and_caps_tokens():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    rl = RateLimiter(rpm=120, tpm=1000, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        rl.acquire()
    assert now[0] == pytest.approx(1.0)  # 0, 0.5, 1.0
    rl.spent(1200)  # over the minute's budget: the next request waits for the window to pass
    rl.acquire()
    assert now[0] == pytest.approx(61.0)


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_and_pays_nothing_twice(tmp_path):
    def slow_gold(req: Request) -> str:
        time.sleep(0.15)
        return gold(req)

    with ProviderServer("openai", responder=slow_gold) as srv:
        path = write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=2, timeout=5)])
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        cmd = [sys.executable, "-m", "felix", "harvest", "--config", str(path), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        store = tmp_path / "store.sqlite"
        deadline = time.time() + 60
        while time.time() < deadline and ok_count(store) < 8:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        done_before = {json.loads(r["request"])["user"] for r in store_rows(store) if r["status"] == "ok"}
        asked_before = len(srv.requests)
        assert 8 <= len(done_before) < len(DEV)
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        after = srv.requests[asked_before:]
    assert not done_before & {r.user for r in after}  # no stored answer was asked for again
    rows = store_rows(store)
    assert len(rows) == len(DEV) and all(r["status"] == "ok" for r in rows)


def test_gemini_batch_harvest(tmp_path):
    with ProviderServer("gemini", responder=gold, batch_polls_before_end=2) as srv:
        path = write_config(tmp_path, [teacher("g1", "gemini", srv.url, mode="batch", batch_poll_seconds=0.01)],
                            tasks=["episode_summarization"])
        result = run_harvest(load_harvest_config(path), progress=False)
    n = result["items"]
    assert result["run"]["ok"] == n and result["totals"]["gemini:g1-model"]["gate_passed"] == n
    assert len(srv.requests) == n


def test_json_mode_reaches_the_wire(tmp_path):
    with ProviderServer("openai", responder=gold) as a, ProviderServer("gemini", responder=gold) as g:
        path = write_config(tmp_path, [teacher("a", "openai", a.url, json_mode=True),
                                       teacher("g", "gemini", g.url, json_mode=True)], tasks=["encoding"])
        run_harvest(load_harvest_config(path), progress=False, limit=1)
    assert a.requests[0].body["response_format"] == {"type": "json_object"}
    assert g.requests[0].body["generationConfig"]["responseMimeType"] == "application/json"
    bad = write_config(tmp_path, [teacher("c", "anthropic", a.url, json_mode=True)])
    with pytest.raises(FelixError, match="no JSON mode"):
        load_harvest_config(bad)


def test_batches_are_split_at_batch_size(tmp_path):
    with ProviderServer("anthropic", responder=gold) as srv:
        path = write_config(tmp_path, [teacher("b1", "anthropic", srv.url, mode="batch", batch_poll_seconds=0.01,
                                               batch_size=3)], tasks=["retrieval_synthesis"])
        result = run_harvest(load_harvest_config(path), progress=False)
        creates = [c for c in srv.calls if c == ("POST", "/v1/messages/batches")]
    n = result["items"]
    assert result["run"]["ok"] == n and len(creates) == -(-n // 3)


def test_batch_submit_is_retried_after_a_transient_failure(tmp_path, monkeypatch):
    from felix.teachers import AnthropicTeacher, TransientError

    real_submit = AnthropicTeacher.submit_batch
    calls = []

    def flaky_submit(self, requests):  # the provider's 429 on the create call, once
        calls.append(len(requests))
        if len(calls) == 1:
            raise TransientError("HTTP 429: slow down", 429, retry_after=0.0)
        return real_submit(self, requests)

    monkeypatch.setattr(AnthropicTeacher, "submit_batch", flaky_submit)
    with ProviderServer("anthropic", responder=gold) as srv:
        path = write_config(tmp_path, [teacher("b1", "anthropic", srv.url, mode="batch", batch_poll_seconds=0.01)],
                            tasks=["encoding"])
        result = run_harvest(load_harvest_config(path), progress=False)
    assert len(calls) == 2 and result["run"]["ok"] == result["items"] and result["run"]["failed"] == 0
