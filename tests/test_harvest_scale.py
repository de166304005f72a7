"""Harvest and synth at scale, as behaviour: what a large run keeps bounded (answers not yet stored, commits per
request, memory held per row) whatever the number of requests. The timings behind them are in
docs/benchmarks.md ("Harvest and synth at scale")."""

from __future__ import annotations

import json
import random
import time
import tracemalloc

import pytest

pytest.importorskip("openai")

from provider_servers import ProviderServer  # noqa: E402
from test_harvest import gold, teacher, write_config  # noqa: E402
from test_synth import write_config as synth_config  # noqa: E402

from felix import harvest_runner  # noqa: E402
from felix.harvest import judge_task, load_items, task_job  # noqa: E402
from felix.harvest_config import load_harvest_config  # noqa: E402
from felix.harvest_report import compare_teachers, export_training  # noqa: E402
from felix.harvest_runner import IN_FLIGHT_PER_WORKER, Harvester  # noqa: E402
from felix.harvest_store import HarvestStore, Job  # noqa: E402
from felix.synth import run_synth, select_documents, synth_jobs  # noqa: E402
from felix.synth_mix import near_duplicates  # noqa: E402


def test_answers_received_but_not_stored_stay_within_a_window(tmp_path):
    """A kill loses the answers received and not stored yet. The pool was handed every job at once, so against a
    fast server the workers ran the whole run ahead of the thread that stores answers (a SIGKILL at 28k of 42k
    stored had lost 13.8k paid answers); now they run at most a window of jobs ahead."""
    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=2, timeout=10)]))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)]
        ahead: list[int] = []

        def slow_judge(job, c):
            time.sleep(0.01)  # a store or judge slower than the server, as under load
            asked = len({r.user for r in list(srv.requests)})  # a job asked again after a timeout counts once
            ahead.append(asked - len(ahead))  # jobs asked, not stored yet, this one included
            return judge_task(job, c)

        with HarvestStore(cfg.store_path) as store:
            run = Harvester(cfg, store, slow_judge, progress=False).run(jobs)
    assert run["ok"] == len(jobs) == 40
    assert max(ahead) <= IN_FLIGHT_PER_WORKER * 2


def test_a_run_registers_its_requests_a_chunk_per_commit(tmp_path):
    """Registering the owed requests took a commit each (6 s of a fresh 42k-request run's start); they land a
    chunk per transaction, and each answer after them in one of its own."""
    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url)]))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)]
        with HarvestStore(cfg.store_path) as store:
            commits = []  # statements that end a transaction: COMMIT, or a write in autocommit mode

            def trace(sql: str) -> None:
                if sql == "COMMIT" or (sql.startswith(("INSERT", "UPDATE")) and not store.db.in_transaction):
                    commits.append(sql.split(" (")[0])

            store.db.set_trace_callback(trace)
            run = Harvester(cfg, store, judge_task, progress=False).run(jobs)
            store.db.set_trace_callback(None)
    assert run["ok"] == len(jobs) == 40
    assert commits.count("COMMIT") == len(commits) == 1 + len(jobs)  # the registration's, then one per answer


def _store_of_answers(path, n: int, prompt_chars: int, teachers=("openai:a", "openai:b")) -> set[str]:
    """A store holding `n` passing answers per teacher, each asked with a prompt of `prompt_chars` characters."""
    keys = set()
    with HarvestStore(path) as store, store.transaction():
        for t in teachers:
            for i in range(n):
                job = Job(f"{t}-{i}", "harvest", "encoding", f"item-{i:04d}", t.split(":")[1], t, "v1",
                          "s" * prompt_chars, f"Encode memory {i}.")
                store.add(job)
                store.record_answer(job.key, status="ok", text='{"gist": "g"}', output={"significance": i % 3},
                                    gate={}, passed=True, reason=None, input_tokens=1, output_tokens=1,
                                    cost_usd=0.0, latency_s=0.0)
                keys.add(job.key)
    return keys


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_and_diff_hold_answers_one_at_a_time(tmp_path):
    """Both held every stored answer, prompts included (10 KB an answer: 440 MB for 42k); export now streams each
    file, diff keeps what it compares. 2 x 300 answers with 20 KB prompts: 12 MB of prompts, a few KB at a time."""
    keys = _store_of_answers(tmp_path / "store.sqlite", 300, 20_000)
    with HarvestStore(tmp_path / "store.sqlite") as store:
        exported, peak_export = _peak_bytes(lambda: export_training(store, tmp_path / "out", keys))
        compared, peak_diff = _peak_bytes(lambda: compare_teachers(store, keys))
    out = tmp_path / "out" / "encoding"
    assert exported["written"] == 600
    assert exported["files"] == {str(out / "openai_a.jsonl"): 300, str(out / "openai_b.jsonl"): 300}
    ids = [json.loads(line)["id"] for line in (out / "openai_a.jsonl").read_text().splitlines()]
    assert ids == sorted(ids) and len(ids) == 300
    assert compared["pairs"][0]["shared"] == 300 and compared["pairs"][0]["decision_agreement"] == 1.0
    assert peak_export < 2_000_000 and peak_diff < 2_000_000


def test_near_duplicates_holds_a_signature_per_text_not_its_shingles():
    """Every text's shingle set was held to the end (about 8 KB a rephrasing: 1 GB of `synth mix`'s memory for 100k);
    a signature (512 bytes) is held, and shingles are made again for the texts LSH pairs up."""
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(5000)}" for _ in range(120)) for _ in range(2000)]
    texts.append(texts[7].replace(texts[7].split()[3], "changed", 1))  # a near copy of an earlier text
    dropped, peak = _peak_bytes(lambda: near_duplicates(texts))
    assert dropped == {2000}
    assert peak < 2500 * len(texts)  # the shingle sets took 17 KB a text here


def test_a_resumed_synth_run_keeps_only_the_requests_still_owed(tmp_path, monkeypatch):
    """Every request of the run was made and held before the store said which were owed (1.5 KB each: 600 MB for a
    resumed run of 400k requests with nothing left to ask); now they are made as they are registered, a chunk at a
    time, and only the owed ones are kept. 400 documents of 3,000 characters x 4 formats: 5 MB of prompts."""
    monkeypatch.setattr(harvest_runner, "REGISTER_CHUNK", 50)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document {i}: " + "words and 42 numbers " * 140}) + "\n"
                           for i in range(400)), encoding="utf-8")
    cfg = load_harvest_config(synth_config(tmp_path, "http://127.0.0.1:9"))  # asked nothing: every answer is stored
    with HarvestStore(cfg.store_path) as store, store.transaction():
        for job in synth_jobs(select_documents(cfg).documents, cfg.synth.formats, cfg.teachers):
            store.add(job)
            store.record_answer(job.key, status="ok", text="1. a\n2. b", output=None, gate=None, passed=True,
                                reason=None, input_tokens=1, output_tokens=1, cost_usd=0.0, latency_s=0.0)
    result, peak = _peak_bytes(lambda: run_synth(cfg, progress=False))
    assert result["requests"] == 1600 and result["run"]["owed"] == 0
    assert peak < 3_500_000  # the documents (1.2 MB, read twice) and a chunk of requests


class Logged(ProviderServer):
    """A provider server that notes each HTTP call, with its protocol, in a log shared with others."""

    def __init__(self, protocol: str, log: list[tuple[str, str, str]], **kw):
        super().__init__(protocol, responder=gold, **kw)
        self.log = log

    def _handle(self, h, method):
        self.log.append((self.protocol, method, h.path.split("?", 1)[0]))
        super()._handle(h, method)


def test_batch_teachers_are_all_submitted_before_any_is_waited_for(tmp_path):
    """A batch takes a provider minutes to a day. Each batch teacher's batches were sent only once the teacher
    before it had been collected, and sync teachers ran before any: a run took the sum of the waits. Now every
    batch is out first, the sync teachers run while the providers work, and then the batches are collected."""
    log: list[tuple[str, str, str]] = []
    with Logged("anthropic", log, batch_polls_before_end=2) as ant, Logged("gemini", log) as gem, \
            Logged("openai", log) as oai:
        batch = {"mode": "batch", "batch_poll_seconds": 0.01}
        cfg = load_harvest_config(write_config(tmp_path, [teacher("a", "anthropic", ant.url, **batch),
                                                          teacher("g", "gemini", gem.url, **batch),
                                                          teacher("o", "openai", oai.url)], tasks=["encoding"]))
        jobs = [task_job(it, t) for t in cfg.teachers for it in load_items(cfg)]
        with HarvestStore(cfg.store_path) as store:
            run = Harvester(cfg, store, judge_task, progress=False).run(jobs)
    assert run["ok"] == len(jobs) == 30
    created = [i for i, (p, m, path) in enumerate(log) if m == "POST" and "batch" in path.lower()]
    collected = [i for i, (p, m, path) in enumerate(log) if p == "anthropic" and path.endswith("/results")]
    asked = [i for i, (p, m, path) in enumerate(log) if p == "openai" and path.endswith("/chat/completions")]
    assert len(created) == 2 and len(collected) == 1 and len(asked) == 10
    assert max(created) < min(asked) and max(created) < min(collected)
