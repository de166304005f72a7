"""Harvest edge cases against the local provider servers: usage fields that are easy to misread, truncation
reasons other than max_tokens, batch create/poll faults, and a run stopped while answers are on the way."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from provider_servers import ProviderServer, Request  # noqa: E402
from test_harvest import gold, schema_invalid, store_rows, teacher, write_config  # noqa: E402

from felix.cli import main as felix_main  # noqa: E402
from felix.errors import RunStopped  # noqa: E402
from felix.harvest import judge_task, load_items, run_harvest, task_job  # noqa: E402
from felix.harvest_config import TeacherConfig, load_harvest_config  # noqa: E402
from felix.harvest_runner import Harvester  # noqa: E402
from felix.harvest_store import HarvestStore  # noqa: E402
from felix.signal_handlers import sigterm_interrupts  # noqa: E402
from felix.teachers import make_teacher  # noqa: E402


class OneBody(ProviderServer):
    """Answers every completion with `body` (status 200)."""

    def __init__(self, protocol: str, body: dict):
        super().__init__(protocol)
        self.body = body

    def _complete(self, h, req):
        self._record(req)
        h.reply(200, self.body)


def test_gemini_thinking_tokens_are_counted_as_output():
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 300,
                              "totalTokenCount": 315}}
    with OneBody("gemini", body) as srv:
        c = make_teacher(TeacherConfig(**teacher("g", "gemini", srv.url))).complete("s", "u")
    assert (c.input_tokens, c.output_tokens) == (10, 305)  # billed as output: candidates + thoughts


def test_anthropic_answer_cut_by_the_context_window_is_truncated():
    body = {"id": "m", "type": "message", "role": "assistant", "model": "m", "content": [{"type": "text", "text": "{"}],
            "stop_reason": "model_context_window_exceeded", "usage": {"input_tokens": 3, "output_tokens": 1}}
    with OneBody("anthropic", body) as srv:
        c = make_teacher(TeacherConfig(**teacher("a", "anthropic", srv.url))).complete("s", "u")
    assert c.truncated


class FlakyBatches(ProviderServer):
    """The first batch status poll (or create) fails with `fault`: a dropped connection, a cut-off body, or
    an HTTP status with a retry-after."""

    def __init__(self, protocol: str, fault: str, on: str = "get", **kw):
        super().__init__(protocol, responder=gold, **kw)
        self.fault, self.on, self.fired = fault, on, False

    def _maybe_fault(self, h, where: str) -> bool:
        if self.fired or where != self.on:
            return False
        self.fired = True
        if self.fault == "kill":
            h.kill()
        elif self.fault == "garbage":
            h.reply(200, raw=b'{"name": "batches/x", "metad')
        else:
            self._error(h, int(self.fault), "slow down", {"retry-after": "0.25"})
        return True

    def _gemini_batch_get(self, h, name):
        if not self._maybe_fault(h, "get"):
            super()._gemini_batch_get(h, name)

    def _anthropic_batch_get(self, h, batch_id):
        if not self._maybe_fault(h, "get"):
            super()._anthropic_batch_get(h, batch_id)

    def _gemini_batch_create(self, h, path, body, model):
        if not self._maybe_fault(h, "create"):
            super()._gemini_batch_create(h, path, body, model)


@pytest.mark.parametrize(("provider", "fault"), [("gemini", "kill"), ("gemini", "garbage"), ("anthropic", "garbage")])
def test_a_failed_batch_poll_is_polled_again_not_fatal(tmp_path, provider, fault):
    with FlakyBatches(provider, fault) as srv:
        cfg = load_harvest_config(write_config(
            tmp_path, [teacher("b1", provider, srv.url, mode="batch", batch_poll_seconds=0.01)], tasks=["encoding"]))
        result = run_harvest(cfg, progress=False, limit=2)
    assert srv.fired and result["run"]["ok"] == 2 and len(srv.requests) == 2  # one batch, collected


def test_gemini_batch_create_honours_retry_after(tmp_path):
    delays: list[float] = []
    with FlakyBatches("gemini", "429", on="create") as srv:
        cfg = load_harvest_config(write_config(
            tmp_path, [teacher("b1", "gemini", srv.url, mode="batch", batch_poll_seconds=0.01)], tasks=["encoding"]))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:2]]
        with HarvestStore(cfg.store_path) as store:
            run = Harvester(cfg, store, judge_task, progress=False, sleep=delays.append).run(jobs)
    assert run["ok"] == 2 and delays[0] == pytest.approx(0.25)


class ByItem(ProviderServer):
    """Per user prompt: "slow" answers after 0.5 s, "limited" is always 429 (retry-after 0.3), and "fast" answers
    as soon as the others' requests have arrived (or after 10 s): on a loaded machine their worker threads may
    not have sent them yet when the fast answer comes back and the run stops."""

    def __init__(self, plan: dict[str, str]):
        super().__init__("openai", responder=gold)
        self.plan = plan
        self.arrived = {"slow": threading.Event(), "limited": threading.Event()}

    def _complete(self, h, req):
        kind = self.plan.get(req.user)
        if kind in self.arrived:
            self.arrived[kind].set()
        if kind == "limited":
            self._record(req)
            self._error(h, 429, "slow down", {"retry-after": "0.3"})
            return
        if kind == "slow":
            time.sleep(0.5)
        if kind == "fast":
            for kind_ in (k for k in self.arrived if k in self.plan.values()):
                self.arrived[kind_].wait(10)
        super()._complete(h, req)


def interrupt_on_answer(n: int):
    """The real judge, except that judging the n-th answer is interrupted (Ctrl-C)."""
    calls = []

    def judge(job, c):
        calls.append(job.key)
        if len(calls) == n:
            raise KeyboardInterrupt
        return judge_task(job, c)

    return judge


def test_an_interrupted_run_keeps_answers_in_flight_and_asks_nothing_more(tmp_path):
    with ByItem({}) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=3, timeout=5)],
                                               tasks=["encoding"]))
        fast, slow, limited = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:3]]
        srv.plan = {fast.user: "fast", slow.user: "slow", limited.user: "limited"}
        # the slow request is in flight when the run stops (the limited one may be too, between its 429s)
        with pytest.warns(UserWarning, match=r"waiting for the requests in flight \(up to \d, at most 5 s each\)"), \
                HarvestStore(cfg.store_path) as store, pytest.raises(KeyboardInterrupt):
            Harvester(cfg, store, interrupt_on_answer(1), progress=False).run([fast, slow, limited])
        time.sleep(0.6)  # past the 429's retry-after: a worker that kept going would have asked again
        asked_limited = srv.count(limited.user)
    status = {r["key"]: r["status"] for r in store_rows(cfg.store_path)}
    assert status[slow.key] == "ok"  # answered (and paid) after the interrupt: stored, not dropped
    assert asked_limited == 1  # no retry once the run stopped


@pytest.mark.filterwarnings("ignore:stopping")
def test_an_interrupt_does_not_wait_out_the_rate_limit(tmp_path):
    """Workers waiting for their turn under `rpm` stop with the run: they have sent nothing to wait for (a Ctrl-C
    took `concurrency` x 60/rpm seconds, 35 s at rpm 6 and concurrency 4, to exit, silently)."""
    with ProviderServer("openai", responder=gold) as srv:
        cfg = load_harvest_config(write_config(
            tmp_path, [teacher("t1", "openai", srv.url, concurrency=3, rpm=6, timeout=5)], tasks=["encoding"]))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:3]]
        t0 = time.monotonic()
        with HarvestStore(cfg.store_path) as store, pytest.raises(KeyboardInterrupt):
            Harvester(cfg, store, interrupt_on_answer(1), progress=False).run(jobs)
        elapsed = time.monotonic() - t0
    assert elapsed < 5  # the other two workers' turns were 10 s and 20 s away
    assert len(srv.requests) == 1


def test_an_interrupt_with_requests_still_queued_returns(tmp_path):
    """A job still queued behind the teacher's concurrency when the run stops is cancelled, never sent, and
    not waited for: `as_completed` never yields a future cancelled by `cancel()` (the run hung for good)."""
    with ByItem({}) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1, timeout=5)],
                                               tasks=["encoding"]))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:3]]
        # the worker may take the second job once the first is answered, before the judge interrupts; it is
        # slow, so the third is still queued when the run stops
        srv.plan = {jobs[1].user: "slow", jobs[2].user: "slow"}
        outcome = []

        def run():
            with HarvestStore(cfg.store_path) as store:
                try:
                    Harvester(cfg, store, interrupt_on_answer(1), progress=False).run(jobs)
                except KeyboardInterrupt:
                    outcome.append("interrupted")

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the interrupted run hangs waiting for queued requests"
        assert outcome == ["interrupted"] and srv.count(jobs[0].user) == 1 and srv.count(jobs[2].user) == 0


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # sigterm_interrupts: RunStopped in the main thread, as in `felix synth`


def test_a_stop_as_a_request_leaves_is_stored_once_answered(tmp_path, monkeypatch):
    """SIGTERM after a worker sent its request but before the pool's submit returned to the harvester: the
    answer that comes back is paid for and must be stored (it was lost: the harvester never heard of it)."""
    arrived = threading.Event()

    def answer_late(req):
        arrived.set()
        time.sleep(0.2)  # the answer is on its way when the run stops
        return gold(req)

    real_submit = ThreadPoolExecutor.submit

    def submit_then_stop(pool, *args, **kwargs):
        # Decided before the request can leave: a worker fast enough to be answered before the check came after
        # `real_submit` left the run unstopped (the test's own race, seen under load).
        first = pool._thread_name_prefix.startswith("teacher-") and not arrived.is_set()
        fut = real_submit(pool, *args, **kwargs)
        if first:
            assert arrived.wait(10)
            _sigterm()
        return fut

    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit_then_stop)
    with ProviderServer("openai", responder=answer_late) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1, timeout=5)],
                                               tasks=["encoding"]))
        job = task_job(load_items(cfg)[0], cfg.teachers[0])
        harvester = Harvester(cfg, HarvestStore(cfg.store_path), judge_task, progress=False)
        with harvester.store, sigterm_interrupts(), pytest.raises(RunStopped):
            harvester.run([job])
    assert [r["status"] for r in store_rows(cfg.store_path)] == ["ok"] and harvester.summary()["ok"] == 1


def test_a_stop_while_an_answer_is_judged_stores_it_and_stops(tmp_path):
    """SIGTERM while the first answer is being judged: it is stored (it was lost: taken off the requests in
    flight before it was stored), the one in flight is stored too, and the queued one is never asked."""
    second_sent, signalled = threading.Event(), threading.Event()
    seen: list[str] = []

    def judge(job, c):
        if not signalled.is_set():
            assert second_sent.wait(10)  # the second is in flight as the first is judged
            _sigterm()  # held until the answer is stored; the workers send nothing more from now on
            signalled.set()
        return judge_task(job, c)

    def responder(req):
        seen.append(req.user)
        if len(seen) == 2:
            second_sent.set()
            signalled.wait(10)
        return gold(req)

    with ProviderServer("openai", responder=responder) as srv:
        cfg = load_harvest_config(write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1, timeout=5)],
                                               tasks=["encoding"]))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:3]]
        before = signal.getsignal(signal.SIGINT)
        with HarvestStore(cfg.store_path) as store, sigterm_interrupts(), pytest.raises(RunStopped):
            Harvester(cfg, store, judge, progress=False).run(jobs)
    assert signal.getsignal(signal.SIGINT) is before  # the run's own handlers are gone with it
    status = {r["key"]: r["status"] for r in store_rows(cfg.store_path)}
    assert len(srv.requests) == 2 and [status[j.key] for j in jobs] == ["ok", "ok", "pending"]


def test_a_batch_collected_again_after_an_interrupt_is_counted_once(tmp_path):
    with ProviderServer("anthropic", responder=schema_invalid) as srv:
        cfg = load_harvest_config(write_config(
            tmp_path, [teacher("b1", "anthropic", srv.url, mode="batch", batch_poll_seconds=0.01)],
            tasks=["encoding"], retry={"max_retries": 0, "max_attempts": 1}))
        jobs = [task_job(it, cfg.teachers[0]) for it in load_items(cfg)[:4]]
        with HarvestStore(cfg.store_path) as store:
            with pytest.raises(KeyboardInterrupt):  # stopped halfway through collecting the batch
                Harvester(cfg, store, interrupt_on_answer(3), progress=False).run(jobs)
            Harvester(cfg, store, judge_task, progress=False).run(jobs)  # the batch is collected on restart
            totals = store.totals("harvest")["anthropic:b1-model"]
    assert srv.answered == 4 and totals["paid_attempts"] == 4
    assert [r["attempts"] for r in store_rows(cfg.store_path)] == [1] * 4


def test_interrupted_harvest_json_prints_what_it_did(tmp_path, capsys):
    """SIGTERM mid-run: exit 143 with the partial object on stdout, as `felix synth` does (it printed nothing)."""
    sent = []

    def stop_on_first(req: Request) -> str:
        if not sent:
            sent.append(1)
            _sigterm()
            time.sleep(0.3)  # the answer is in flight when the run stops: it is stored
        return gold(req)

    with ProviderServer("openai", responder=stop_on_first) as srv:
        path = write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1, timeout=5)],
                            tasks=["encoding"])
        capsys.readouterr()
        assert felix_main(["harvest", "--config", str(path), "--limit", "3", "--no-progress", "--json"]) == 143
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with HarvestStore(tmp_path / "store.sqlite") as store:
        kept = sum(1 for _ in store.rows("harvest", "ok"))
    assert result["interrupted"] == "SIGTERM" and result["requests"] == 3 and result["run"]["owed"] == 3
    assert result["run"]["ok"] == kept >= 1 and result["totals"]["openai:t1-model"]["ok"] == kept
