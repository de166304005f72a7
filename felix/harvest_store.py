"""The harvest store: one SQLite file (WAL) holding every request, attempt and batch.

A request's key is a content hash of what was asked and of whom, so re-running a harvest never pays
for an answer twice, and a crash or SIGKILL loses at most the requests in flight: each answer is
committed the moment it arrives. `attempts` keeps every paid answer (for cost accounting) and every
transport failure (for diagnosis); `requests` holds each request's latest state.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from felix.errors import FelixError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
# pending: never answered; ok: answered well-formed (the gate verdict is stored beside it);
# failed: malformed or unanswered, worth asking again; gave_up: malformed on every allowed attempt, or
# refused for good by the provider.
STATUSES = ("pending", "ok", "failed", "gave_up")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
  key TEXT PRIMARY KEY,
  kind TEXT NOT NULL,            -- harvest | synth
  task TEXT NOT NULL,            -- task name, or synth format
  item_id TEXT NOT NULL,
  teacher TEXT NOT NULL,         -- provider:model (the teacher's identity)
  prompt_version TEXT NOT NULL,
  request TEXT NOT NULL,         -- JSON {system, user, input, meta}
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,   -- answered (paid) attempts
  text TEXT, output TEXT, gate TEXT, passed INTEGER, reason TEXT,
  input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
  cost_usd REAL NOT NULL DEFAULT 0, updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_teacher ON requests (teacher, kind, status);
CREATE TABLE IF NOT EXISTS attempts (
  key TEXT NOT NULL, at REAL NOT NULL, outcome TEXT NOT NULL, reason TEXT,
  input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
  cost_usd REAL NOT NULL DEFAULT 0, latency_s REAL
);
CREATE INDEX IF NOT EXISTS attempts_by_key ON attempts (key);
CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY, teacher TEXT NOT NULL, keys TEXT NOT NULL, status TEXT NOT NULL,
  created REAL NOT NULL, updated REAL NOT NULL
);
"""


def request_key(**fields: Any) -> str:
    """sha256 of the canonical JSON of what identifies a request."""
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _still_owed(row: sqlite3.Row, max_attempts: int) -> bool:
    """Whether a stored request needs asking: never answered, or failed with attempts left."""
    return row["status"] == "pending" or (row["status"] == "failed" and row["attempts"] < max_attempts)


@dataclass(frozen=True)
class Job:
    """One request to one teacher, with everything needed to ask it again after a crash."""

    key: str
    kind: str
    task: str
    item_id: str
    teacher: str  # the configured teacher's name (its identity is in the key)
    identity: str
    prompt_version: str
    system: str
    user: str
    input: Any = None
    meta: Any = None


class HarvestStore:
    """SQLite store of requests, attempts and batches. Use from one thread (the harvest loop's)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process kill
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise FelixError(f"{self.path}: not a usable harvest store: {exc}") from None
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row["v"]) != SCHEMA_VERSION:
            raise FelixError(f"{self.path}: store schema v{row['v']}, this felix reads v{SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> HarvestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------

    def row(self, key: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM requests WHERE key=?", (key,)).fetchone()

    def last_outcome(self, key: str) -> str | None:
        """The outcome of a request's latest attempt (answered, malformed, transport, refused), if any."""
        row = self.db.execute("SELECT outcome FROM attempts WHERE key=? ORDER BY at DESC, rowid DESC LIMIT 1",
                              (key,)).fetchone()
        return None if row is None else row["outcome"]

    def add(self, job: Job) -> None:
        """Register a request as owed (a no-op when the key is already known)."""
        req = json.dumps({"system": job.system, "user": job.user, "input": job.input, "meta": job.meta},
                         ensure_ascii=False)
        self.db.execute("INSERT OR IGNORE INTO requests (key, kind, task, item_id, teacher, prompt_version, request, "
                        "status, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                        (job.key, job.kind, job.task, job.item_id, job.identity, job.prompt_version, req, time.time()))

    def register(self, job: Job, max_attempts: int) -> bool:
        """`add` the request unless it is known, and say whether it is `owed`. A resumed run registers every
        request again: a known one costs a lookup of two columns, not an insert and the request's JSON."""
        row = self.db.execute("SELECT status, attempts FROM requests WHERE key=?", (job.key,)).fetchone()
        if row is None:
            self.add(job)
            return True
        return _still_owed(row, max_attempts)

    def job(self, row: sqlite3.Row, teacher_name: str) -> Job:
        """Rebuild the job a stored request was made from."""
        req = json.loads(row["request"])
        return Job(row["key"], row["kind"], row["task"], row["item_id"], teacher_name, row["teacher"],
                   row["prompt_version"], req["system"], req["user"], req.get("input"), req.get("meta"))

    def owed(self, job: Job, max_attempts: int) -> bool:
        """Whether the request still needs asking: not answered, and attempts left."""
        row = self.row(job.key)
        return row is None or _still_owed(row, max_attempts)

    def record_answer(self, key: str, *, status: str, text: str, output: Any, gate: Any, passed: bool | None,
                      reason: str | None, input_tokens: int, output_tokens: int, cost_usd: float,
                      latency_s: float) -> None:
        """One paid answer: an attempt row, and the request's new state, in one transaction."""
        assert status in STATUSES
        now = time.time()
        with self.transaction():
            self.db.execute("INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (key, now, "answered" if status == "ok" else "malformed", reason, input_tokens,
                             output_tokens, cost_usd, latency_s))
            # An answer already kept is never replaced (a late duplicate may be malformed); what was paid
            # for is counted either way.
            keep = "CASE WHEN status='ok' THEN {0} ELSE ? END"
            self.db.execute(
                f"UPDATE requests SET status={keep.format('status')}, text={keep.format('text')}, "
                f"output={keep.format('output')}, gate={keep.format('gate')}, passed={keep.format('passed')}, "
                f"reason={keep.format('reason')}, attempts=attempts+1, input_tokens=input_tokens+?, "
                "output_tokens=output_tokens+?, cost_usd=cost_usd+?, updated=? WHERE key=?",
                (status, text, None if output is None else json.dumps(output, ensure_ascii=False),
                 None if gate is None else json.dumps(gate, ensure_ascii=False),
                 None if passed is None else int(passed), reason, input_tokens, output_tokens, cost_usd, now, key))

    def record_failure(self, key: str, reason: str, *, refused: bool = False, give_up: bool | None = None) -> None:
        """A request that got no answer (transport gave up, or the provider refused it): nothing was paid. A
        refusal gives the request up unless `give_up` is False (a refused key: the request was not at fault)."""
        now = time.time()
        give_up = refused if give_up is None else give_up
        with self.transaction():
            self.db.execute("INSERT INTO attempts (key, at, outcome, reason) VALUES (?, ?, ?, ?)",
                            (key, now, "refused" if refused else "transport", reason))
            self.db.execute("UPDATE requests SET status=?, reason=?, updated=? WHERE key=? AND status != 'ok'",
                            ("gave_up" if give_up else "failed", reason, now, key))

    def reset_gave_up(self, kind: str) -> int:
        """Make requests that were given up owed again (`--retry-failed`); their attempts restart (paid
        attempts are counted from the `attempts` table, which keeps them)."""
        cur = self.db.execute("UPDATE requests SET status='failed', attempts=0 WHERE status='gave_up' AND kind=?",
                              (kind,))
        return cur.rowcount

    def rows(self, kind: str, status: str | None = None, *, columns: str = "*",
             order: str = "teacher, task, item_id") -> Iterator[sqlite3.Row]:
        """The requests of `kind` (and `status`), streamed in `order`; `columns` (SQL) names what a row holds:
        a store's rows hold every prompt, so a reader of many should take only the columns it reads."""
        q, args = f"SELECT {columns} FROM requests WHERE kind=?", [kind]
        if status is not None:
            q, args = q + " AND status=?", [*args, status]
        yield from self.db.execute(f"{q} ORDER BY {order}", args)

    # -- batches --------------------------------------------------------------------------------

    def add_batch(self, batch_id: str, teacher: str, keys: list[str]) -> None:
        now = time.time()
        self.db.execute("INSERT INTO batches VALUES (?, ?, ?, 'submitted', ?, ?)",
                        (batch_id, teacher, json.dumps(keys), now, now))

    def open_batches(self, teacher: str) -> list[tuple[str, list[str]]]:
        rows = self.db.execute("SELECT id, keys FROM batches WHERE teacher=? AND status='submitted' ORDER BY created",
                               (teacher,))
        return [(r["id"], json.loads(r["keys"])) for r in rows]

    def close_batch(self, batch_id: str, status: str = "collected") -> None:
        """Stop polling a batch: `collected`, or `lost` when the provider no longer knows it."""
        self.db.execute("UPDATE batches SET status=?, updated=? WHERE id=?", (status, time.time(), batch_id))

    # -- accounting -----------------------------------------------------------------------------

    def totals(self, kind: str) -> dict[str, dict[str, Any]]:
        """Per teacher identity: requests by status, gate passes, tokens and cost over every paid attempt."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.db.execute(
                "SELECT teacher, status, COUNT(*) n, SUM(COALESCE(passed, 0)) passed, SUM(input_tokens) tin, "
                "SUM(output_tokens) tout, SUM(cost_usd) cost FROM requests WHERE kind=? "
                "GROUP BY teacher, status", (kind,)):
            t = out.setdefault(r["teacher"], {s: 0 for s in STATUSES} | {
                "gate_passed": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "paid_attempts": 0})
            t[r["status"]] += r["n"]
            t["gate_passed"] += r["passed"] or 0
            t["input_tokens"] += r["tin"] or 0
            t["output_tokens"] += r["tout"] or 0
            t["cost_usd"] = round(t["cost_usd"] + (r["cost"] or 0.0), 6)
        # From `attempts`, not requests.attempts: --retry-failed restarts that count, but not what was paid.
        for r in self.db.execute(
                "SELECT r.teacher, COUNT(*) n FROM attempts a JOIN requests r ON r.key = a.key WHERE r.kind=? "
                "AND a.outcome IN ('answered', 'malformed') GROUP BY r.teacher", (kind,)):
            if r["teacher"] in out:
                out[r["teacher"]]["paid_attempts"] = r["n"]
        return out

    def failure_reasons(self, kind: str, per_teacher: int = 3) -> dict[str, list[dict[str, Any]]]:
        """Per teacher identity: the most common reasons its requests stand `failed` or `gave_up` (a bad key, a
        provider down, truncation), each with how many requests; the reasons were scrubbed of keys when stored."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.db.execute(
                "SELECT teacher, COALESCE(reason, '') reason, COUNT(*) n FROM requests WHERE kind=? AND status IN "
                "('failed', 'gave_up') GROUP BY teacher, reason ORDER BY teacher, n DESC, reason", (kind,)):
            reasons = out.setdefault(r["teacher"], [])
            if len(reasons) < per_teacher:
                reasons.append({"reason": r["reason"], "requests": r["n"]})
        return out

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store for one run: two runs at once would ask (and pay for) the same requests. The lock
        is released when the process ends, however it ends; the `.lock` file itself may stay."""
        if fcntl is None:  # no flock (Windows): runs are not guarded
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FelixError(f"{self.path}: another harvest or synth run is using this store; "
                                 "wait for it to finish") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that see one state of the store, while a run goes on writing (WAL): a read transaction, which
        takes no lock a writer waits for."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes that land together or not at all; one inside another joins the outer one."""
        if self.db.in_transaction:
            yield
            return
        with _Transaction(self.db):
            yield


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
