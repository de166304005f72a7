"""Ask teachers a list of jobs: concurrency, batches, accounting, and a failing teacher paused; each request
within its teacher's rate limits and with retries (`felix.teacher_request`).

Workers only talk to the network; the calling thread judges each answer and writes it to the store
the moment it arrives, so the store has one writer and a kill loses only requests in flight.
"""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from felix.harvest_config import HarvestConfig, TeacherConfig
from felix.harvest_store import HarvestStore, Job
from felix.signal_handlers import HeldStops
from felix.teacher_breaker import TeacherBreaker, refuses_every_request
from felix.teacher_request import RateLimiter, ask, backoff_delay
from felix.teachers import (
    BatchResult,
    Completion,
    PermanentError,
    Teacher,
    TeacherError,
    TransientError,
    make_teacher,
    scrub,
)


@dataclass(frozen=True)
class Judgement:
    """What a judge makes of one answer: ok (kept, with the gate's verdict) or malformed (asked again)."""

    ok: bool
    output: Any = None
    gate: Any = None
    passed: bool | None = None
    reason: str | None = None


Judge = Callable[[Job, Completion], Judgement]
REGISTER_CHUNK = 1000  # jobs registered in the store per commit at the start of a run
IN_FLIGHT_PER_WORKER = 2  # jobs handed to a teacher's pool at a time, per worker (see `Harvester._run_sync`)


class Harvester:
    """Runs jobs against the configured teachers and records everything in the store."""

    def __init__(self, cfg: HarvestConfig, store: HarvestStore, judge: Judge, secrets: list[str] | None = None,
                 progress: bool = True, sleep: Callable[[float], Any] | None = None):
        self.cfg, self.store, self.judge = cfg, store, judge
        self.secrets = [s for s in (secrets or []) if s]
        self.progress = progress
        self.sleep = sleep  # None: real waits (a worker's backoff then ends early when the run stops)
        self.counts = {"ok": 0, "malformed": 0, "failed": 0, "cost_usd": 0.0}
        self.owed = 0  # requests the current run found owed (known to a caller a stop interrupted too)
        self.uncounted: set[str] = set()  # teachers whose answers came without token counts (warned once)
        self.stopped: dict[str, str] = {}  # teachers this run stopped asking: the refusal that stopped them

    def _wait(self, seconds: float) -> None:
        """The run's own waits (batch polls and retries): the injected sleep, else a real one."""
        (self.sleep or time.sleep)(seconds)

    def redact(self, text: str | None) -> str | None:
        """Error texts come from servers and SDKs: make sure no key ever reaches the store through them."""
        return None if text is None else scrub(text, self.secrets)

    def _record(self, job: Job, tcfg: TeacherConfig, c: Completion, latency: float) -> bool:
        """Judge and store one answer; True when the job should be asked again."""
        j = self.judge(job, c)
        row = self.store.row(job.key)
        attempts = (row["attempts"] if row is not None else 0) + 1
        status = "ok" if j.ok else ("gave_up" if attempts >= self.cfg.retry.max_attempts else "failed")
        cost = tcfg.price.cost(c.input_tokens, c.output_tokens)
        if not c.counted and tcfg.name not in self.uncounted:
            self.uncounted.add(tcfg.name)
            warnings.warn(f"teacher {tcfg.name}: its server sends no token counts (no usage block), so its answers "
                          "are recorded as 0 tokens and $0: the cost figures of `harvest run` and `status` leave "
                          "them out and its tpm limit sees none of their tokens", stacklevel=2)
        self.store.record_answer(job.key, status=status, text=c.text, output=j.output, gate=j.gate, passed=j.passed,
                                 reason=self.redact(j.reason), input_tokens=c.input_tokens,
                                 output_tokens=c.output_tokens, cost_usd=cost, latency_s=latency)
        self.counts["ok" if j.ok else "malformed"] += 1
        self.counts["cost_usd"] += cost
        return status == "failed" and (row is None or row["status"] != "ok")  # a kept answer is never re-asked

    def _fail(self, job: Job, exc: TeacherError) -> None:
        # a refusal of the teacher (a bad key) says nothing about the request: it stays owed
        refused = isinstance(exc, PermanentError)
        self.store.record_failure(job.key, self.redact(exc.reason) or "", refused=refused,
                                  give_up=refused and not refuses_every_request(exc))
        self.counts["failed"] += 1

    def _stop_teacher(self, name: str, exc: TeacherError, left: int) -> None:
        reason = self.redact(exc.reason) or ""
        self.stopped[name] = reason
        warnings.warn(f"teacher {name} refuses every request ({reason}): it is asked nothing more this run, and its "
                      f"{left} requests not sent yet stay owed for the next", stacklevel=2)

    def run(self, jobs: Iterable[Job]) -> dict[str, Any]:
        """Ask every owed job; returns this run's counts. Safe to interrupt and run again. `jobs` is read once,
        and only the owed ones are kept: a generator keeps a resumed run's memory to what is left to ask."""
        with self.store.lock():
            return self._run(jobs)

    def _run(self, jobs: Iterable[Job]) -> dict[str, Any]:
        owed: dict[str, Job] = {}  # by key: two items asking the same thing are one request, paid once
        # Registered a chunk per commit: a commit per job took most of a fresh run's start (6 s for 42k jobs before
        # the first request), and one commit for all would grow the WAL by the size of every request.
        jobs = iter(jobs)
        while chunk := list(itertools.islice(jobs, REGISTER_CHUNK)):
            with self.store.transaction():
                for job in chunk:
                    if job.key not in owed and self.store.register(job, self.cfg.retry.max_attempts):
                        owed[job.key] = job
        self.owed = len(owed)
        by_teacher: dict[str, list[Job]] = defaultdict(list)
        for job in owed.values():
            by_teacher[job.teacher].append(job)
        teachers = {name: make_teacher(self.cfg.teacher(name)) for name in by_teacher}
        bar = tqdm(total=len(owed), desc="harvest", unit="req", disable=not self.progress, dynamic_ncols=True)
        try:
            sync = {n: js for n, js in by_teacher.items() if teachers[n].cfg.mode == "sync"}
            batch = {n: js for n, js in by_teacher.items() if teachers[n].cfg.mode == "batch"}
            run_sync = (lambda: self._run_sync(teachers, sync, bar)) if sync else None
            if batch:
                self._run_batches(teachers, batch, bar, meanwhile=run_sync)
            elif run_sync is not None:
                run_sync()
        finally:
            bar.close()
        return self.summary()

    def run_into(self, result: dict[str, Any], jobs: Iterable[Job], kind: str) -> dict[str, Any]:
        """`run(jobs)` with its counts in `result["run"]` and the store's `kind` totals in `result["totals"]`.
        On Ctrl-C/SIGTERM the answers stored before the stop are paid for and worth reporting: `result`, with
        the signal's name in `interrupted`, rides on the exception as `partial`."""
        try:
            result["run"] = self.run(jobs)
        except KeyboardInterrupt as exc:
            result["interrupted"] = signal.Signals(getattr(exc, "exit_code", 130) - 128).name
            result["run"] = self.summary()
            result["totals"] = self.store.totals(kind)
            exc.partial = result  # type: ignore[attr-defined]
            raise
        result["totals"] = self.store.totals(kind)
        return result

    def summary(self) -> dict[str, Any]:
        """This run's counts so far: requests owed, answers kept, malformed and failed, and their cost."""
        return {"owed": self.owed, **{k: round(v, 6) if isinstance(v, float) else v for k, v in self.counts.items()},
                "stopped_teachers": dict(self.stopped)}

    def _tick(self, bar: tqdm, done: bool) -> None:
        if done:
            bar.update(1)
        bar.set_postfix(ok=self.counts["ok"], failed=self.counts["failed"] + self.counts["malformed"],
                        cost=f"${self.counts['cost_usd']:.4f}", refresh=False)

    def _run_sync(self, teachers: dict[str, Teacher], by_teacher: dict[str, list[Job]], bar: tqdm) -> None:
        pools = {n: ThreadPoolExecutor(teachers[n].cfg.concurrency, thread_name_prefix=f"teacher-{n}")
                 for n in by_teacher}
        limiters = {n: RateLimiter(teachers[n].cfg.rpm, teachers[n].cfg.tpm) for n in by_teacher}
        # A pool is handed at most `window` jobs at a time, the next as one is stored: its workers never wait for
        # the main thread, yet answers received and not stored yet (what a kill loses) stay a handful however many
        # jobs the run has, and so do the futures each `wait` looks at. Handed every job at once, the workers ran
        # tens of thousands of answers ahead of the one thread that stores them.
        window = {n: IN_FLIGHT_PER_WORKER * teachers[n].cfg.concurrency for n in by_teacher}
        queued = {n: deque(js) for n, js in by_teacher.items()}
        handed: dict[str, int] = defaultdict(int)
        breakers = {n: TeacherBreaker(self.cfg.retry) for n in by_teacher}
        running: dict[Future, Job] = {}
        stop = threading.Event()
        pause = self.sleep or stop.wait

        def stop_all() -> None:
            stop.set()
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)

        def submit(job: Job) -> None:
            # Held: a worker may send the request before `submit` returns, and a stop between the two would
            # leave a paid request that `running`, and so `_keep_in_flight`, never hears of.
            with stops.hold():
                fut = pools[job.teacher].submit(ask, teachers[job.teacher], job, limiters[job.teacher],
                                                self.cfg.retry, pause, stop=stop)
                running[fut] = job
                handed[job.teacher] += 1

        def refill(name: str) -> None:
            while (queued[name] and handed[name] < window[name] and not stop.is_set()
                   and breakers[name].admit(queued[name][0].key)):
                submit(queued[name].popleft())

        def next_probe() -> float | None:
            """Seconds until a paused teacher with jobs left may send its probe; None: none is paused."""
            due = [t for n, b in breakers.items() if queued[n] and (t := b.wakes_at()) is not None]
            return max(0.0, min(due) - time.monotonic()) if due else None

        def take(fut: Future) -> None:
            # Held: an answer leaves `running` only once it is stored (a stop in between would lose it).
            with stops.hold():
                job = running.pop(fut)
                name, breaker = job.teacher, breakers[job.teacher]
                handed[name] -= 1
                try:
                    c, latency = fut.result()
                except TeacherError as exc:
                    self._fail(job, exc)
                    self._tick(bar, True)
                    if refuses_every_request(exc):
                        if name not in self.stopped:
                            self._stop_teacher(name, exc, len(queued[name]))
                        queued[name].clear()
                    elif not isinstance(exc, TransientError):
                        breaker.answered()  # the provider refused this request: it is up
                    elif (seconds := breaker.failed(job.key)) is not None:
                        warnings.warn(f"teacher {name}: {breaker.failures} requests in a row failed every retry "
                                      f"(last: {self.redact(exc.reason)}); sending it nothing for {seconds:g} s, "
                                      "then one request to see whether it is back", stacklevel=2)
                else:
                    if (paused_for := breaker.answered()) is not None:
                        warnings.warn(f"teacher {name} answers again after {paused_for:.0f} s paused",
                                      stacklevel=2)
                    again = self._record(job, teachers[name].cfg, c, latency)
                    if again:
                        submit(job)
                    self._tick(bar, not again)
                refill(name)

        stops = HeldStops(on_held=stop.set)  # workers send nothing more while a held stop waits
        try:
            with stops:
                for name in by_teacher:
                    refill(name)
                while True:
                    delay = next_probe()
                    if not running and delay is None:
                        break
                    if running:  # woken by an answer, or when a paused teacher may send its probe
                        finished, _ = wait(running, timeout=delay, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            take(fut)
                    else:  # every teacher with jobs left is paused
                        stop.wait(delay)
                    for name in by_teacher:
                        refill(name)
        except BaseException:
            stop_all()  # first: queued requests are cancelled, never sent
            self._keep_in_flight(running, teachers)
            raise
        finally:
            stop_all()

    def _keep_in_flight(self, running: dict[Future, Job], teachers: dict[str, Teacher]) -> None:
        """After the loop broke (Ctrl-C, a crash): requests already sent are paid for once answered, and the
        interpreter waits for their threads before it exits anyway, so their answers are stored, not dropped.
        Requests still queued were cancelled by the pools' shutdown, never sent: `as_completed` would wait for
        them forever (a future cancelled by `cancel()` never counts as done there)."""
        sent = [f for f in running if not f.cancelled()]
        if waiting := [running[f] for f in sent if not f.done()]:
            # A provider that hangs holds the stop up to its timeout, silently, and a second Ctrl-C cannot end the
            # workers' threads: say what it waits for.
            longest = max(teachers[job.teacher].cfg.timeout for job in waiting)
            warnings.warn(f"stopping: waiting for the requests in flight (up to {len(waiting)}, at most {longest:g} s "
                          "each) to store their answers, which are paid for either way", stacklevel=2)
        for fut in as_completed(sent):
            job = running[fut]
            try:
                c, latency = fut.result()
            except BaseException:  # cancelled, stopped before asking, or unanswered: nothing was paid
                continue
            try:
                self._record(job, teachers[job.teacher].cfg, c, latency)
            except Exception:  # the store or judge that broke the loop: keep the first error
                return

    def _run_batches(self, teachers: dict[str, Teacher], by_teacher: dict[str, list[Job]], bar: tqdm,
                     meanwhile: Callable[[], None] | None = None) -> None:
        """Submit owed jobs as batches, every teacher's before any is waited for, run `meanwhile` (the sync
        teachers) while the providers work on them, collect them, and again for what is owed again. One teacher's
        batches were waited for before the next teacher's were sent, and sync teachers ran before any: a run took
        the sum of the teachers' batch latencies (hours each) instead of the longest. A batch already submitted is
        polled, never resubmitted."""
        by_key = {n: {j.key: j for j in js} for n, js in by_teacher.items()}
        submitted: dict[str, int] = defaultdict(int)  # per run, so a request the provider always fails ends
        while True:
            open_batches = [(n, batch_id, keys) for n in by_teacher
                            for batch_id, keys in self._submit_owed(teachers[n], by_key[n], submitted, bar)]
            if meanwhile is not None:
                meanwhile()
                meanwhile = None
            if not open_batches:
                return
            for name, batch_id, keys in open_batches:
                self._collect(teachers[name], batch_id, keys, by_key[name], bar)

    def _submit_owed(self, teacher: Teacher, by_key: dict[str, Job], submitted: dict[str, int],
                     bar: tqdm) -> list[tuple[str, list[str]]]:
        """Submit the teacher's owed jobs not in an open batch as new batches; every open batch of the teacher.
        A job whose batch could not be submitted is failed and left out of `by_key` (it waits for the next run)."""
        tcfg = teacher.cfg
        open_batches = self.store.open_batches(tcfg.identity)
        in_flight = {k for _, keys in open_batches for k in keys}
        todo = {k: j for k, j in by_key.items() if k not in in_flight and submitted[k] < self.cfg.retry.max_attempts
                and self.store.owed(j, self.cfg.retry.max_attempts)}
        keys = list(todo)
        for start in range(0, len(keys), tcfg.batch_size):  # providers cap a batch's requests and bytes
            chunk = {k: todo[k] for k in keys[start:start + tcfg.batch_size]}
            for k in chunk:
                submitted[k] += 1
            try:
                batch_id = self._submit(teacher, {k: (j.system, j.user) for k, j in chunk.items()})
            except TeacherError as exc:
                if refuses_every_request(exc):
                    self._stop_teacher(tcfg.name, exc, len(keys) - start)
                for job in (todo[k] for k in keys[start:]):
                    self._fail(job, exc)
                    self._tick(bar, True)
                for k in todo:
                    del by_key[k]
                break
            self.store.add_batch(batch_id, tcfg.identity, list(chunk))
            open_batches.append((batch_id, list(chunk)))
        return open_batches

    def _submit(self, teacher: Teacher, requests: dict[str, tuple[str, str]]) -> str:
        """Submit one batch, retrying transient failures like any request (a 429 on create costs nothing)."""
        rng = random.Random()
        for retry in range(self.cfg.retry.max_retries + 1):
            try:
                return teacher.submit_batch(requests)
            except TransientError as exc:
                if retry == self.cfg.retry.max_retries:
                    raise
                self._wait(backoff_delay(retry, self.cfg.retry, exc.retry_after, rng))
        raise AssertionError("unreachable")

    @staticmethod
    def _poll(teacher: Teacher, batch_id: str) -> dict[str, BatchResult] | None:
        """The batch's results, or None while it runs or when a poll failed in passing."""
        try:
            return teacher.poll_batch(batch_id)
        except TransientError:
            return None

    def _collect(self, teacher: Teacher, batch_id: str, keys: list[str], by_key: dict[str, Job], bar: tqdm) -> None:
        try:
            results = self._poll(teacher, batch_id)
            while results is None:  # still running: keep polling; a kill here resumes with this same batch
                self._wait(teacher.cfg.batch_poll_seconds)
                results = self._poll(teacher, batch_id)
        except PermanentError as exc:
            # The provider no longer knows the batch (expired, purged, another endpoint): left open, it would
            # hold its keys, and every batch after it, for good. Its requests are owed again.
            reason = self.redact(f"batch {batch_id} lost: {exc.reason}") or ""
            with self.store.transaction():
                for key in keys:
                    self.store.record_failure(key, reason)
                    self.counts["failed"] += 1
                    self._tick(bar, False)
                self.store.close_batch(batch_id, "lost")
            return
        # A batch's answers arrive together: they are stored with its closing in one commit, or a run stopped
        # halfway would collect the batch again on restart and count its malformed answers twice.
        with self.store.transaction():
            for key in keys:
                row = self.store.row(key)
                if row is None or row["status"] == "ok":
                    continue
                res = results.get(key)
                if res is None or res.completion is None:
                    reason = res.error if res is not None else "missing from the batch results"
                    self.store.record_failure(key, self.redact(reason) or "")
                    self.counts["failed"] += 1
                    self._tick(bar, False)
                    continue
                # A batch from an earlier run may hold requests this run did not build: what was paid is kept.
                job = by_key.get(key) or self.store.job(row, teacher.cfg.name)
                again = self._record(job, teacher.cfg, res.completion, 0.0)
                self._tick(bar, not again)
            self.store.close_batch(batch_id)
