"""Harvest against servers that misbehave in ways the fault list does not script: odd 200 bodies, odd
retry-after values, batches the provider forgot, keys echoed back, duplicate items, concurrent runs."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from provider_servers import ProviderServer  # noqa: E402
from test_harvest import CANARY, DEV, GOLD, KEY_ENV, gold, store_rows, teacher, write_config  # noqa: E402

from felix.cli import main as felix_main  # noqa: E402
from felix.errors import FelixError  # noqa: E402
from felix.harvest import configured_keys, judge_task, load_items, run_harvest, task_job  # noqa: E402
from felix.harvest_config import TeacherConfig, load_harvest_config  # noqa: E402
from felix.harvest_runner import Harvester  # noqa: E402
from felix.harvest_store import HarvestStore  # noqa: E402
from felix.tasks.suite import corrupt  # noqa: E402
from felix.teachers import RETRY_AFTER_MAX, TransientError, make_teacher, parse_retry_after, scrub  # noqa: E402


class Scripted(ProviderServer):
    """Answers completions from `script` (one entry per request, then gold): a body to send with status
    200, ("raw", bytes, content type), ("status", code, {headers}[, message]), or a function of the request
    returning one of those."""

    def __init__(self, protocol: str, script: list, **kw):
        super().__init__(protocol, responder=gold, **kw)
        self.script = list(script)

    def _complete(self, h, req):
        if not self.script:
            return super()._complete(h, req)
        self._record(req)
        step = self.script.pop(0)
        if callable(step):
            step = step(req)
        if isinstance(step, tuple) and step[0] == "raw":
            h.reply(200, raw=step[1], content_type=step[2])
        elif isinstance(step, tuple) and step[0] == "status":  # ("status", code, headers[, message])
            self._error(h, step[1], step[3] if len(step) > 3 else "scripted", step[2])
        else:
            h.reply(200, step)


def _openai_200(content) -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


MALFORMED_200 = {
    "openai": [{"id": "c1", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop"}]},  # no message
               {"error": {"message": "upstream timed out", "code": 502}},
               ("raw", b"<html>bad gateway</html>", "text/html")],
    "anthropic": [("raw", b"<html>bad gateway</html>", "text/html"),
                  {"id": "m", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
                   "usage": {"input_tokens": 1, "output_tokens": 1}},
                  {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}}],
}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_malformed_200_bodies_are_transient_and_retried(tmp_path, provider):
    bodies = MALFORMED_200[provider]
    with Scripted(provider, bodies) as srv:
        t = make_teacher(TeacherConfig(**teacher("t", provider, srv.url)))
        for _ in bodies:
            with pytest.raises(TransientError):
                t.complete("s", "u")
        srv.script = list(bodies)
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", provider, srv.url, concurrency=1)],
                                               tasks=["encoding"]))
        result = run_harvest(cfg, progress=False, limit=1)
    assert result["run"]["ok"] == 1 and result["run"]["failed"] == 0  # retried past all three, nothing crashed


def test_openai_content_parts_and_anthropic_missing_usage_are_read(tmp_path):
    def parts(req) -> dict:
        return _openai_200([{"type": "text", "text": gold(req)[:20]}, {"type": "text", "text": gold(req)[20:]}])

    with Scripted("openai", [parts]) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url)], tasks=["encoding"]))
        result = run_harvest(cfg, progress=False, limit=1)
    (row,) = store_rows(cfg.store_path)
    assert result["run"]["ok"] == 1 and row["status"] == "ok" and json.loads(row["text"]) == json.loads(
        gold(srv.requests[0]))
    no_usage = {"id": "m", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
                "content": [{"type": "text", "text": "hi"}]}
    with Scripted("anthropic", [no_usage]) as srv:
        c = make_teacher(TeacherConfig(**teacher("t", "anthropic", srv.url))).complete("s", "u")
    assert (c.text, c.input_tokens, c.output_tokens, c.counted) == ("hi", 0, 0, False)


def test_a_teacher_whose_answers_carry_no_token_counts_is_warned_about_once(tmp_path):
    def no_usage(req) -> dict:
        return {k: v for k, v in _openai_200(gold(req)).items() if k != "usage"}

    bare = {k: v for k, v in _openai_200("hi").items() if k != "usage"}
    with Scripted("openai", [bare, no_usage, no_usage, no_usage]) as srv:
        assert not make_teacher(TeacherConfig(**teacher("t", "openai", srv.url))).complete("s", "u").counted
        cfg = load_harvest_config(write_config(tmp_path, [teacher("quiet", "openai", srv.url, concurrency=1)],
                                               tasks=["encoding"]))
        with pytest.warns(UserWarning, match="teacher quiet: its server sends no token counts") as caught:
            result = run_harvest(cfg, progress=False, limit=3)
    assert result["run"]["ok"] == 3 and len(srv.script) == 0  # all three answered without counts
    assert sum("no token counts" in str(w.message) for w in caught) == 1
    with Scripted("openai", [_openai_200("hi")]) as srv:
        c = make_teacher(TeacherConfig(**teacher("t", "openai", srv.url))).complete("s", "u")
    assert c.counted and (c.input_tokens, c.output_tokens) == (10, 5)


def test_odd_retry_after_values_fall_back_to_backoff_and_are_capped(tmp_path):
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "1e400"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({"retry-after": "86400"}) == RETRY_AFTER_MAX
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    delays: list[float] = []
    script = [("status", 429, {"retry-after": "soon"}), ("status", 503, {"retry-after": "1e400"}),
              ("status", 429, {"retry-after": "99999"})]
    with Scripted("openai", script) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1)],
                                               tasks=["encoding"]))
        with HarvestStore(cfg.store_path) as store:
            run = Harvester(cfg, store, judge_task, progress=False, sleep=delays.append).run(
                [task_job(load_items(cfg)[0], cfg.teachers[0])])
    assert run["ok"] == 1 and len(srv.requests) == 4
    assert all(d <= 0.01 for d in delays[:2]) and delays[2] == RETRY_AFTER_MAX  # jitter, jitter, capped


def test_a_key_echoed_across_the_cut_is_scrubbed_whole(tmp_path, monkeypatch):
    assert scrub("x" * 10 + CANARY, [CANARY], limit=20) == "x" * 10 + "[redacted]"  # 10-char prefix at the cut
    assert scrub("key sk-ca", [CANARY]) == "key sk-ca"  # too short a prefix to be a key
    monkeypatch.setenv(KEY_ENV, CANARY)
    for pad in (436, 441, 446):  # the key ends at, or straddles, the 500-char cut (19, 14 or 9 chars in)
        echo = lambda req, p=pad: ("status", 401, None, "x" * p + " rejected " + req.headers["authorization"])  # noqa: E731
        with Scripted("openai", [echo]) as srv:
            d = tmp_path / str(pad)
            d.mkdir()
            cfg = load_harvest_config(write_config(d, [teacher("t1", "openai", srv.url, api_key_env=KEY_ENV)],
                                                   tasks=["encoding"]))
            run_harvest(cfg, progress=False, limit=1)
        blob = (d / "store.sqlite").read_bytes() + b"".join(
            f.read_bytes() for f in d.glob("store.sqlite-*"))
        reasons = [r[0] for r in sqlite3.connect(cfg.store_path).execute("SELECT reason FROM attempts")]
        assert reasons and all("rejected" in r for r in reasons)
        assert not any(CANARY[:8] in r for r in reasons), reasons
        assert CANARY[:8].encode() not in blob


def test_a_batch_the_provider_forgot_is_closed_and_its_requests_asked_again(tmp_path):
    with ProviderServer("anthropic", responder=gold) as srv:
        path = write_config(tmp_path, [teacher("b1", "anthropic", srv.url, mode="batch", batch_poll_seconds=0.01)],
                            tasks=["principle_abstraction"])
        cfg = load_harvest_config(path)
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)]
        with HarvestStore(cfg.store_path) as store:
            for j in jobs:
                store.add(j)
            store.add_batch("msgbatch_gone", cfg.teachers[0].identity, [j.key for j in jobs[:2]])
        first = run_harvest(cfg, progress=False)
        again = run_harvest(cfg, progress=False)
    assert first["run"]["ok"] == len(jobs) and first["run"]["failed"] == 2  # the lost batch's two, re-asked
    assert again["run"]["owed"] == 0
    batches = dict(sqlite3.connect(cfg.store_path).execute("SELECT id, status FROM batches").fetchall())
    assert batches.pop("msgbatch_gone") == "lost" and set(batches.values()) == {"collected"}
    reasons = [r[0] for r in sqlite3.connect(cfg.store_path).execute(
        "SELECT reason FROM attempts WHERE outcome='transport'")]
    assert len(reasons) == 2 and all("msgbatch_gone lost: HTTP 404" in r for r in reasons)


def test_duplicate_items_are_asked_once_and_an_ok_answer_is_never_overwritten(tmp_path):
    it = next(i for i in DEV if i["task"] == "encoding")
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"id": f"a{k}", "task": it["task"], "input": it["input"]}) + "\n" for k in range(2)))
    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url)],
                                               items=[{"file": "items.jsonl"}]))
        result = run_harvest(cfg, progress=False)
    assert result["run"]["owed"] == 1 and srv.answered == 1
    (row,) = store_rows(cfg.store_path)
    with HarvestStore(cfg.store_path) as store:  # a late, malformed answer to the same request
        store.record_answer(row["key"], status="failed", text="{}", output={}, gate=None, passed=False,
                            reason="malformed", input_tokens=5, output_tokens=5, cost_usd=1.0, latency_s=0.1)
        t = store.totals("harvest")["openai:t1-model"]
    (after,) = store_rows(cfg.store_path)
    assert (after["status"], after["text"], after["passed"]) == ("ok", row["text"], 1)
    assert t["paid_attempts"] == 2 and t["cost_usd"] == pytest.approx(row["cost_usd"] + 1.0)  # still counted


def test_a_second_run_on_a_busy_store_is_refused(tmp_path):
    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url)], tasks=["encoding"]))
        busy = pytest.raises(FelixError, match="another harvest or synth run is using this store")
        with HarvestStore(cfg.store_path) as store, store.lock(), busy:
            run_harvest(cfg, progress=False, limit=1)
        assert srv.requests == []
        assert run_harvest(cfg, progress=False, limit=1)["run"]["ok"] == 1  # released once the holder is done


def test_nan_answers_are_malformed_and_never_exported(tmp_path):
    def nan(req) -> str:
        return gold(req).replace('"salience": ' + json.dumps(GOLD[req.user]["reference"]["salience"]),
                                 '"salience": NaN')

    with ProviderServer("openai", responder=nan) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url)],
                                               tasks=["episode_summarization"]))
        result = run_harvest(cfg, progress=False, limit=1)
    assert result["run"]["ok"] == 0 and srv.answered == 3  # asked max_attempts times, never kept
    (row,) = store_rows(cfg.store_path)
    assert row["status"] == "gave_up" and "non_finite_number" in row["reason"]


@pytest.mark.parametrize(("record", "message"), [
    ({"id": "r1", "task": "retrieval_synthesis", "input": "what broke?"},
     "items.jsonl:1: retrieval_synthesis input must be an object"),
    ({"id": "p1", "task": "principle_abstraction", "input": {"memories": ["M1 text"]}},
     "items.jsonl:1: memories[0] must be an object"),
    ({"id": "e1", "task": "encoding", "input": {"text": "x"}}, "items.jsonl:1: encoding input must be a string"),
])
def test_item_inputs_of_the_wrong_shape_name_file_and_line(tmp_path, record, message):
    (tmp_path / "items.jsonl").write_text(json.dumps(record) + "\n")
    path = write_config(tmp_path, [teacher("t1", "openai", "http://127.0.0.1:9")], items=[{"file": "items.jsonl"}])
    with pytest.raises(FelixError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_harvest(load_harvest_config(path), progress=False)


def test_answers_of_the_wrong_shape_are_malformed_not_fatal(tmp_path):
    with ProviderServer("openai", responder=lambda req: '{"structured_concepts": [1]}') as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url)], tasks=["encoding"]))
        result = run_harvest(cfg, progress=False, limit=1)
        assert run_harvest(cfg, progress=False, limit=1)["run"]["owed"] == 0  # recorded: not asked again
    (row,) = store_rows(cfg.store_path)
    assert result["run"]["malformed"] == 3 and srv.answered == 3
    assert (row["status"], row["attempts"]) == ("gave_up", 3) and row["reason"].startswith("malformed:")
    assert "wrong_type" in [f["code"] for f in json.loads(row["gate"])["findings"]]


def test_teachers_whose_names_slug_alike_export_to_separate_files(tmp_path):
    from felix.harvest_report import export_training

    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("a", "openai", srv.url, model="org/m"),
                                                          teacher("b", "openai", srv.url, model="org_m")],
                                               tasks=["encoding"]))
        run_harvest(cfg, progress=False, limit=2)
    with HarvestStore(cfg.store_path) as store:
        exported = export_training(store, tmp_path / "out", configured_keys(cfg))
    files = sorted((tmp_path / "out" / "encoding").glob("*.jsonl"))
    assert len(files) == 2 and exported["written"] == 4
    by_file = {f.name: {json.loads(line)["teacher"] for line in f.read_text().splitlines()} for f in files}
    assert sorted(t for ts in by_file.values() for t in ts) == ["openai:org/m", "openai:org_m"]
    assert all(len(ts) == 1 and name.startswith("openai_org_m-") for name, ts in by_file.items())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_local_server_is_reached_whatever_the_proxy_settings(monkeypatch, provider):
    """httpx follows http_proxy for 127.0.0.1 too: a harvest from a local llama.cpp server behind a proxy
    setting sent its requests to the proxy (here a closed port) and failed."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with ProviderServer(provider) as srv:
        c = make_teacher(TeacherConfig(**teacher("t", provider, srv.url))).complete("s", "u")
    assert srv.answered == 1 and c.text


def test_loopback_names_this_machine_only():
    from felix.teachers import loopback

    assert all(map(loopback, ["http://127.0.0.1:8080/v1", "http://localhost:1234", "http://[::1]:80", "http://127.5.0.1"]))
    assert not any(map(loopback, ["https://api.openai.com/v1", "http://10.0.0.2:80", None, "http://localhost.example"]))


def test_export_takes_only_the_answers_its_config_asks_for(tmp_path, capsys):
    def harvest(teachers: list[dict]) -> None:
        run_harvest(load_harvest_config(write_config(tmp_path, teachers, tasks=["encoding"])), progress=False, limit=2)

    with ProviderServer("openai", responder=gold) as srv:
        harvest([teacher("t1", "openai", srv.url, max_tokens=1024), teacher("t2", "openai", srv.url)])
        harvest([teacher("t1", "openai", srv.url, max_tokens=2000)])  # new settings: asked again, new keys
    assert len(store_rows(tmp_path / "store.sqlite")) == 6
    path, out = tmp_path / "harvest.yaml", tmp_path / "out"
    capsys.readouterr()
    assert felix_main(["harvest", "export", "--config", str(path), "--out", str(out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["written"] == 2 and exported["not_in_config"] == 4  # was 6: t1's items twice, and t2's
    assert [f.name for f in (out / "encoding").iterdir()] == ["openai_t1-model.jsonl"]
    ids = [json.loads(line)["id"] for line in (out / "encoding" / "openai_t1-model.jsonl").read_text().splitlines()]
    assert ids == sorted(it["id"] for it in [it for it in DEV if it["task"] == "encoding"][:2])
    assert felix_main(["harvest", "export", "--config", str(path), "--out", str(out)]) == 0
    assert "left out 4 stored answers that this config does not ask for" in capsys.readouterr().out


def test_export_removes_the_files_an_earlier_export_wrote_and_it_does_not_and_nothing_else(tmp_path, capsys):
    """Before: a teacher dropped from the config left its file from the last export in --out, so a training mix
    that globs the directory trained on it; files export never wrote (listed by no manifest) stay."""
    with ProviderServer("openai", responder=gold) as srv:
        t1, t2 = teacher("t1", "openai", srv.url), teacher("t2", "openai", srv.url)
        run_harvest(load_harvest_config(write_config(tmp_path, [t1, t2], tasks=["encoding"])), progress=False,
                    limit=2)
    path, out = tmp_path / "harvest.yaml", tmp_path / "out"
    export = ["harvest", "export", "--config", str(path), "--out", str(out), "--json"]
    assert felix_main(export) == 0
    first = json.loads(capsys.readouterr().out)
    assert sorted(f.name for f in (out / "encoding").iterdir()) == ["openai_t1-model.jsonl", "openai_t2-model.jsonl"]
    assert first["removed"] == [] and first["unlisted"] == []
    mine = {out / "notes.txt": "mine", out / "encoding" / "mine.jsonl": "{}\n", out / "old" / "t9.jsonl": "{}\n"}
    for f, text in mine.items():
        f.parent.mkdir(exist_ok=True)
        f.write_text(text)
    manifest = json.loads((out / "harvest-export.json").read_text())
    victim = tmp_path / "victim.jsonl"
    victim.write_text("{}\n")
    manifest["files"] += ["../victim.jsonl", "encoding/../../victim.jsonl", str(victim)]  # never followed out
    (out / "harvest-export.json").write_text(json.dumps(manifest))

    write_config(tmp_path, [t1], tasks=["encoding"])  # t2 dropped from the config
    assert felix_main(export) == 0
    second = json.loads(capsys.readouterr().out)
    assert sorted(f.name for f in (out / "encoding").iterdir()) == ["mine.jsonl", "openai_t1-model.jsonl"]
    assert second["removed"] == [str(out / "encoding" / "openai_t2-model.jsonl")]
    assert second["unlisted"] == sorted(str(f) for f in mine if f.suffix == ".jsonl")
    assert all(f.read_text() == text for f, text in mine.items()) and victim.is_file()
    assert json.loads((out / "harvest-export.json").read_text())["files"] == ["encoding/openai_t1-model.jsonl"]

    (out / "encoding" / "mine.jsonl").unlink()
    write_config(tmp_path, [t1], tasks=["episode_summarization"])  # encoding dropped: its directory goes too
    assert felix_main(export[:-1]) == 0
    said = capsys.readouterr().out
    assert f"removed {out / 'encoding' / 'openai_t1-model.jsonl'}: an earlier export wrote it" in said
    assert f"note: {out / 'old' / 't9.jsonl'} was not written by this export" in said
    assert not (out / "encoding").exists() and (out / "notes.txt").is_file()
    (out / "harvest-export.json").write_text("{not json")  # what it would remove is unknown: refused, not guessed
    assert felix_main(export) == 2
    assert "harvest-export.json: unreadable export manifest" in capsys.readouterr().err


def test_diff_compares_only_the_answers_its_config_asks_for(tmp_path, capsys):
    def fabricated(req) -> str:  # well-formed, fails the gate
        return json.dumps(corrupt(GOLD[req.user], "fabricate_person"))

    def harvest(teachers: list[dict]) -> None:
        run_harvest(load_harvest_config(write_config(tmp_path, teachers, tasks=["encoding"])), progress=False, limit=2)

    with ProviderServer("openai", responder=fabricated) as srv:
        harvest([teacher("t1", "openai", srv.url, max_tokens=1024), teacher("t2", "openai", srv.url)])
    with ProviderServer("openai", responder=gold) as srv:
        harvest([teacher("t1", "openai", srv.url, max_tokens=2000)])  # new settings, new (good) answers
    path = tmp_path / "harvest.yaml"
    capsys.readouterr()
    assert felix_main(["harvest", "diff", "--config", str(path), "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    # was: t2 compared too, and which of t1's two answers to an item counted was up to row order
    assert list(diff["teachers"]) == ["openai:t1-model"] and diff["pairs"] == [] and diff["not_in_config"] == 4
    assert diff["teachers"]["openai:t1-model"]["answered"] == 2
    assert diff["teachers"]["openai:t1-model"]["gate_pass_rate"] == 1.0
    assert felix_main(["harvest", "diff", "--config", str(path)]) == 0
    assert "left out 4 stored answers that this config does not ask for" in capsys.readouterr().out


@pytest.mark.parametrize("provider, header", [("openai", "authorization"), ("anthropic", "authorization"),
                                              ("gemini", "x-goog-api-key")])
def test_a_key_pasted_with_surrounding_whitespace_is_used_stripped(tmp_path, monkeypatch, provider, header):
    monkeypatch.setenv(KEY_ENV, f" {CANARY}\r\n")  # was sent as is: an invalid header, 'connection failed' forever
    with ProviderServer(provider, responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", provider, srv.url, api_key_env=KEY_ENV)],
                                               tasks=["encoding"]))
        assert run_harvest(cfg, progress=False, limit=1)["run"]["ok"] == 1
    assert srv.requests[0].headers[header].removeprefix("Bearer ") == CANARY


def test_a_padded_key_echoed_by_the_server_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, f"{CANARY}\n")
    echo = lambda req: ("status", 401, None, "rejected " + req.headers["authorization"] + ", check it")  # noqa: E731
    with Scripted("openai", [echo]) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, api_key_env=KEY_ENV)],
                                               tasks=["encoding"]))
        run_harvest(cfg, progress=False, limit=1)
    (reason,) = [r[0] for r in sqlite3.connect(cfg.store_path).execute("SELECT reason FROM attempts")]
    assert "rejected Bearer [redacted], check it" in reason and CANARY[:8] not in reason


@pytest.mark.parametrize("key", [CANARY[:6] + " " + CANARY[6:], CANARY[:6] + "\n" + CANARY[6:],
                                 CANARY + "\x1b", CANARY[:6] + "\u00e9" + CANARY[6:]],
                         ids=["space", "newline", "escape", "non-ascii"])
def test_a_key_with_whitespace_or_control_characters_inside_is_refused(tmp_path, monkeypatch, key):
    monkeypatch.setenv(KEY_ENV, key)
    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, api_key_env=KEY_ENV)],
                                               tasks=["encoding"]))
        with pytest.raises(FelixError, match=f"teacher t1: environment variable {KEY_ENV} holds a key with") as info:
            run_harvest(cfg, progress=False, limit=1)
    assert srv.requests == [] and CANARY[:8] not in str(info.value)


def test_status_says_why_requests_are_refused(tmp_path, capsys, monkeypatch):
    """A teacher whose key the provider refuses: `run` and `status` name the 401 and how many requests it took
    (they showed only a count under gave_up); the teacher that answered has no reasons listed."""
    monkeypatch.setenv(KEY_ENV, CANARY)
    with ProviderServer("gemini", faults=["401"] * 3) as bad, ProviderServer("openai", responder=gold) as good:
        path = write_config(tmp_path, [teacher("g", "gemini", bad.url, api_key_env=KEY_ENV),
                                       teacher("o", "openai", good.url)], tasks=["encoding"])
        assert felix_main(["harvest", "--config", str(path), "--limit", "3", "--no-progress"]) == 0
    run_out = capsys.readouterr().out
    assert "teacher g was stopped: HTTP 401" in run_out and "teacher o was stopped" not in run_out
    assert felix_main(["harvest", "status", "--config", str(path)]) == 0
    status_out = capsys.readouterr().out
    for out in (run_out, status_out):
        lines = [ln.split() for ln in out.splitlines() if "HTTP 401" in ln and not ln.startswith("teacher g was")]
        assert len(lines) == 1 and lines[0][:2] == ["gemini:g-model", "3"]
        assert "openai:o-model" not in out.split("most common reasons")[1] and CANARY not in out
    assert felix_main(["harvest", "status", "--config", str(path), "--json"]) == 0
    reasons = json.loads(capsys.readouterr().out)["reasons"]
    assert list(reasons) == ["gemini:g-model"] and reasons["gemini:g-model"][0]["requests"] == 3
