"""A teacher that fails every request is paused and probed, not asked every job; one that refuses its key is
stopped at once, its requests left owed (against local servers that speak the providers' wire protocols)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from provider_servers import ProviderServer  # noqa: E402
from test_harvest import gold, store_rows, teacher, write_config  # noqa: E402

from felix.harvest import run_harvest  # noqa: E402
from felix.harvest_config import RetryConfig, load_harvest_config  # noqa: E402
from felix.teacher_breaker import TeacherBreaker  # noqa: E402

TASKS = ["encoding", "retrieval_synthesis", "principle_abstraction", "episode_summarization"]  # 40 dev jobs


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pauses_start_after_a_run_of_failures_and_double_with_each_failed_probe():
    clock = Clock()
    b = TeacherBreaker(RetryConfig(pause_after=3, pause_seconds=10, pause_max_seconds=25), clock)
    assert [b.failed(k) for k in "abc"] == [None, None, 10]
    assert not b.admit("d") and b.wakes_at() == 110
    clock.now = 110
    assert b.admit("d") and not b.admit("e")  # one probe at a time
    assert b.wakes_at() is None
    assert b.failed("c2") is None and b.wakes_at() is None  # sent before the pause: the probe is still out
    assert b.failed("d") == 20 and b.wakes_at() == 130
    clock.now = 130
    assert b.admit("e") and b.failed("e") == 25  # capped
    clock.now = 155
    assert b.admit("f") and b.answered() == 55  # paused since 100
    assert b.admit("g") and b.admit("h") and b.failures == 0
    assert [b.failed(k) for k in "ij"] == [None, None]  # a new run of failures counts from zero
    b.answered()
    assert [b.failed(k) for k in "klm"] == [None, None, 10]


def test_pause_after_zero_never_pauses():
    b = TeacherBreaker(RetryConfig(pause_after=0), Clock())
    assert all(b.failed(str(i)) is None for i in range(100)) and b.admit("x")


class DownFor(ProviderServer):
    """Answers 503 (overloaded) for `seconds` from its first request, then answers."""

    def __init__(self, seconds: float, **kw) -> None:
        super().__init__("openai", responder=gold, **kw)
        self.seconds = seconds
        self.up_at: float | None = None

    def _next_fault(self) -> str | None:
        now = time.monotonic()
        with self._lock:
            if self.up_at is None:
                self.up_at = now + self.seconds
        return "overloaded" if now < self.up_at else super()._next_fault()


def test_an_outage_is_waited_out_with_one_probe_per_pause(tmp_path, recwarn):
    """Before, each of the 40 jobs was sent through its retries and recorded failed: an outage of a second, at a
    request per few ms, failed all 40, and an hour's outage failed every job of a run."""
    with DownFor(2.0) as srv:
        path = write_config(tmp_path, [teacher("t1", "openai", srv.url, concurrency=1)], tasks=TASKS,
                            retry={"max_retries": 0, "max_attempts": 3, "backoff_base": 0.0, "backoff_max": 0.01,
                                   "pause_after": 2, "pause_seconds": 0.05, "pause_max_seconds": 0.2})
        cfg = load_harvest_config(path)
        result = run_harvest(cfg, progress=False)
        sent_down = sum(r.fault == "overloaded" for r in srv.requests)
    # 2 failures pause it; then a probe after 0.05, 0.1, 0.2, 0.2, ... s: about a dozen fail in 2 s, not 40
    assert 2 < sent_down <= 16 and result["run"]["failed"] == sent_down
    assert result["run"]["ok"] == 40 - sent_down and len(srv.requests) == 40  # each job asked once
    rows = store_rows(cfg.store_path)
    assert sorted(r["status"] for r in rows).count("failed") == sent_down  # owed by the next run
    said = [str(w.message) for w in recwarn]
    assert any("2 requests in a row failed every retry" in m and "nothing for 0.05 s" in m for m in said)
    assert any("nothing for 0.1 s" in m for m in said) and any("t1 answers again after" in m for m in said)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_a_refused_key_stops_the_teacher_and_leaves_its_requests_owed(tmp_path, provider, recwarn):
    """Before, every job was sent, refused and given up: after fixing the key a plain run asked nothing, and
    `--retry-failed` asked again the requests given up for their own answers too (paid again)."""
    with ProviderServer(provider, responder=gold, faults=["401"] * 100) as srv, \
            ProviderServer("openai", responder=gold) as other:
        path = write_config(tmp_path, [teacher("bad", provider, srv.url, concurrency=1),
                                       teacher("good", "openai", other.url)], tasks=TASKS)
        cfg = load_harvest_config(path)
        first = run_harvest(cfg, progress=False)
        # the first refusal stops it; the job its worker already held (2 are handed per worker) is sent too
        sent, stopped = len(srv.requests), first["run"]["stopped_teachers"]
        assert sent <= 2 and first["run"]["failed"] == sent
        assert list(stopped) == ["bad"] and "HTTP 401" in stopped["bad"]
        assert first["totals"]["openai:good-model"]["ok"] == 40  # the other teacher is not held up
        assert any("teacher bad refuses every request" in str(w.message) and f"{40 - sent} requests not sent"
                   in str(w.message) for w in recwarn)
        srv.faults.clear()  # the key is fixed
        again = run_harvest(cfg, progress=False)
    assert again["run"]["owed"] == 40 and again["totals"][f"{provider}:bad-model"]["ok"] == 40
    assert again["run"]["stopped_teachers"] == {}


def test_refusals_of_the_key_credit_access_or_model_are_the_teachers_not_the_requests():
    from felix.teacher_breaker import refuses_every_request
    from felix.teachers import PermanentError, TransientError, classify_status

    assert [refuses_every_request(classify_status(s, "m")) for s in (401, 402, 403, 404)] == [True] * 4
    assert [refuses_every_request(classify_status(s, "m")) for s in (400, 413, 422, 429, 500, 503)] == [False] * 6
    assert not refuses_every_request(PermanentError("no status")) and not refuses_every_request(TransientError("x"))
