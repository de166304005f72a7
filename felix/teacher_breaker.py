"""When to stop asking a teacher: a pause while it fails every request, and a stop when it refuses them all.

Without a pause, a provider that is down or hangs is asked every queued job, each through all its retries (a
hung one holds a worker `timeout` seconds per try), so a run of thousands of jobs takes days to end and records
every one of them failed. With it, after `pause_after` jobs in a row fail every retry, the teacher is sent
nothing for `pause_seconds`; then one job (the probe) is sent, and its answer resumes the teacher while its
failure doubles the pause, up to `pause_max_seconds`. A run stays up through an outage and asks the provider
about once a pause, not once a job.

A refusal about the teacher rather than the request (a bad key, no credit, no access, no such model) stops the
teacher for the run at once: every other job would be refused the same way. The refused request stays owed,
not given up, so a run after the key is fixed asks it again without `--retry-failed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from felix.harvest_config import RetryConfig
from felix.teachers import PermanentError, TeacherError

# 401 unauthenticated, 402 payment required, 403 permission denied, 404 no such model or endpoint
TEACHER_WIDE_STATUS = frozenset({401, 402, 403, 404})


def refuses_every_request(exc: TeacherError) -> bool:
    """Whether a refusal is about the teacher (its key, credit, access or model), not about the request."""
    return isinstance(exc, PermanentError) and exc.status in TEACHER_WIDE_STATUS


class TeacherBreaker:
    """One teacher's pause state. The runner asks `admit` before it hands a job to the teacher's workers, and
    reports each job's outcome with `answered` or `failed`."""

    def __init__(self, policy: RetryConfig, clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy, clock
        self.failures = 0  # jobs in a row that failed every retry
        self.resume_at: float | None = None  # paused until then; None: not paused
        self.pause = 0.0  # the current pause, in seconds
        self.since = 0.0  # when the first of the current run of pauses began
        self.probe: str | None = None  # the key of the job sent to see whether the teacher is back

    def admit(self, key: str) -> bool:
        """Whether the job may be sent now: always, unless paused; once a pause is over, one job, the probe."""
        if self.resume_at is None:
            return True
        if self.probe is not None or self.clock() < self.resume_at:
            return False
        self.probe = key
        return True

    def wakes_at(self) -> float | None:
        """When a paused teacher's probe may be sent (None: not paused, or its probe is out)."""
        return self.resume_at if self.probe is None else None

    def answered(self) -> float | None:
        """A job got an answer (even a malformed one, or a refusal of that request): the teacher is up. Returns
        how long it was paused, when it was."""
        self.failures = 0
        if self.resume_at is None:
            return None
        paused_for = self.clock() - self.since
        self.resume_at, self.probe, self.pause = None, None, 0.0
        return paused_for

    def failed(self, key: str) -> float | None:
        """A job failed every retry. Returns the pause that starts now, if one does: the `pause_after`-th
        failure in a row starts the first, a failed probe the next, twice as long."""
        self.failures += 1
        p = self.policy
        if self.resume_at is None:
            if not p.pause_after or self.failures < p.pause_after:
                return None
            self.pause, self.since = min(p.pause_seconds, p.pause_max_seconds), self.clock()
        elif key == self.probe:
            self.pause = min(2 * self.pause, p.pause_max_seconds)
        else:  # sent before the pause began: it only confirms it
            return None
        self.resume_at, self.probe = self.clock() + self.pause, None
        return self.pause
