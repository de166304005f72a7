"""One request to a teacher: within its rate limits (requests and tokens per minute), with transport retries and
backoff, and no new request or retry once the run is stopping."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from felix.harvest_config import RetryConfig
from felix.harvest_store import Job
from felix.teachers import Completion, Teacher, TransientError


class RateLimiter:
    """Requests per minute (spaced evenly) and tokens per minute (over a sliding 60 s window)."""

    def __init__(self, rpm: float | None, tpm: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.tpm = tpm
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._used: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until one more request fits both limits: True; False as soon as `stop` is set, so a stopped run
        need not wait out every worker's turn (`concurrency` x 60/rpm seconds) before it exits."""
        while True:
            if stop is not None and stop.is_set():
                return False
            with self._lock:
                now = self.clock()
                while self._used and now - self._used[0][0] >= 60.0:
                    self._used.popleft()
                wait_s = max(0.0, self._next - now)
                if self.tpm and self._used and sum(n for _, n in self._used) >= self.tpm:
                    wait_s = max(wait_s, 60.0 - (now - self._used[0][0]))
                if wait_s <= 0:
                    self._next = now + self.interval
                    return True
            if stop is not None:
                stop.wait(wait_s)
            else:
                self.sleep(wait_s)

    def spent(self, tokens: int) -> None:
        """Count tokens a finished request used against the per-minute budget."""
        if self.tpm:
            with self._lock:
                self._used.append((self.clock(), tokens))


def backoff_delay(retry: int, policy: RetryConfig, retry_after: float | None, rng: random.Random) -> float:
    """The server's retry-after when given, else full jitter over an exponentially growing cap."""
    if retry_after is not None:
        return retry_after
    return rng.uniform(0, min(policy.backoff_max, policy.backoff_base * 2 ** retry))


class StopAsking(Exception):
    """The run is stopping (Ctrl-C, a crash): a worker sends no new request and no retry."""


def ask(teacher: Teacher, job: Job, limiter: RateLimiter, policy: RetryConfig,
        sleep: Callable[[float], Any] = time.sleep, rng: random.Random | None = None,
        stop: threading.Event | None = None) -> tuple[Completion, float]:
    """One answered attempt (with transport retries): the completion and its latency in seconds."""
    rng = rng or random.Random()
    for retry in range(policy.max_retries + 1):
        # checked again after acquire: a stop set as the limiter let this request through sends nothing
        if not limiter.acquire(stop) or (stop is not None and stop.is_set()):
            raise StopAsking
        t0 = time.perf_counter()
        try:
            c = teacher.complete(job.system, job.user)
        except TransientError as exc:
            if retry == policy.max_retries:
                raise
            sleep(backoff_delay(retry, policy, exc.retry_after, rng))
            continue
        limiter.spent(c.input_tokens + c.output_tokens)
        return c, time.perf_counter() - t0
    raise AssertionError("unreachable")
