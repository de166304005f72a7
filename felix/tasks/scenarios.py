"""Multi-event material: recurring-lesson families for principle abstraction and timelines for
episode summarization, each with the ground truth of its gold answer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from felix.tasks.world import PROJECTS, basename, day, people, pick_file, short_hash


@dataclass(frozen=True)
class Family:
    """A lesson that recurs across incidents: two phrasings of (title, principle), keywords, and
    `key`, the word a stated principle must use."""

    key: str
    phrasings: list[tuple[str, str]]
    concepts: list[str]


FAMILIES = [
    Family("timeout", [
        ("Bound every outbound call with a timeout",
         "Every call to another service needs an explicit timeout: without one a slow dependency turns into "
         "hung workers instead of a visible, retryable error."),
        ("No network call without a timeout",
         "A call that can wait forever eventually will; give each outbound request a timeout so a slow "
         "dependency fails fast instead of tying up workers.")], ["timeouts", "resilience", "dependencies"]),
    Family("clock", [
        ("Keep the wall clock out of tests",
         "Tests that read the real clock break at day, month or timezone boundaries; inject a clock and pin it "
         "so the result never depends on when the test runs."),
        ("Tests should own their clock",
         "A test whose outcome depends on the current date is flaky by construction; pass the clock in and fix "
         "it in the test.")], ["flaky tests", "time", "determinism"]),
    Family("cache", [
        ("Version cache keys with what they depend on",
         "A cache key must include the version of the data and code that produced the value, otherwise a "
         "migration or deploy keeps serving stale entries until they expire."),
        ("Schema changes must invalidate the cache",
         "When the shape of stored data changes, entries cached under the old shape are wrong; put the schema "
         "version in the cache key so a migration retires them.")], ["caching", "invalidation", "migrations"]),
    Family("backoff", [
        ("Retries need backoff, jitter and a cap",
         "Immediate retries multiply load on a dependency that is already failing; retry with exponential "
         "backoff, jitter and a cap so recovery is not drowned by the retry storm."),
        ("Back off when a dependency fails",
         "Retrying at once turns one outage into a retry storm; space retries out with exponential backoff "
         "and jitter, and stop after a cap.")], ["retries", "backoff", "outages"]),
]


# Two terse memories per family (at most six words each): the minimal principle inputs.
TERSE = {"timeout": ("{a} hung: no timeout", "{b} stuck, call had no timeout"),
         "clock": ("test_{x} flaky near midnight", "test_{y} fails on the 1st, clock again"),
         "cache": ("{a}: stale cache after migration", "{b} served old rows after schema change, cache"),
         "backoff": ("{a} retry storm, no backoff", "{b} hammered the DB retrying, no backoff")}


def terse_pair(rng: random.Random) -> tuple[Family, list[str]]:
    """A family and two terse memories showing its lesson."""
    fam = rng.choice(FAMILIES)
    a, b = rng.sample([p.service for p in PROJECTS], 2)
    x, y = rng.sample(["sync", "report", "expiry", "billing", "digest"], 2)
    return fam, [t.format(a=a, b=b, x=x, y=y) for t in TERSE[fam.key]]


# Each family's memory keeps its surface (service, symptom, people, numbers) around a cause slot.
# The default cause carries the lesson; a decoy keeps the symptom with an unrelated cause, which is
# how the adversarial twins differ: same incidents on the surface, no shared lesson underneath.
_TEMPLATES = {
    "timeout": "Requests to {svc} hung for {n} min: {cause}, so they piled up until {first} restarted the pods.",
    "clock": "test_{test} failed {k} of {runs} CI runs; {first} found it {cause}.",
    "cache": "{svc} served stale results for {n} min after migration {mig}: {cause}. {first} flushed the cache "
             "by hand.",
    "backoff": "During the {dep} outage {svc} {cause}, sending {k}x normal traffic for {n} min; {first} had to "
               "rate-limit it at the proxy.",
}
_CAUSES = {
    "timeout": ["the call to {dep} in {func} ({ref}) had no timeout", "{func} ({ref}) deadlocked on its own lock",
                "a full disk stalled every write from {func} ({ref})",
                "a config push set the worker pool to 1 thread in {func} ({ref})"],
    "clock": ["compares against the current date and breaks near midnight UTC",
              "depends on test order through a shared temp directory",
              "races a background worker that starts with the app", "calls a real endpoint that rate-limits CI"],
    "cache": ["the cache key built in {func} ({ref}) did not include the schema version",
              "a read replica lagged 40 min behind the primary", "the CDN silently ignored the purge request",
              "a cron job re-imported yesterday's snapshot"],
    "backoff": ["retried every failed call immediately", "fell back to full table scans on every request",
                "replayed its whole queue on reconnect", "kept re-adding dead pods through a stale health check"],
}


def instance(rng: random.Random, fam: Family, dense: bool = False, decoy: int = 0) -> tuple[str, list[str]]:
    """One memory in which `fam`'s lesson shows up (decoy=0), or the same memory with unrelated
    cause number `decoy`; and the first names it mentions."""
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    (first, _), = people(rng, 1)
    n, k = rng.randrange(6, 90), rng.randrange(2, 9)
    slots = {"svc": proj.service, "func": func, "ref": f"{basename(path)}:{rng.randrange(30, 400)}", "n": n, "k": k,
             "dep": rng.choice(proj.deps), "first": first, "test": func.lower().split(".")[-1].strip("_"),
             "runs": n + 20, "mig": f"{k:04d}"}
    cause = _CAUSES[fam.key][decoy].format(**slots)
    text = _TEMPLATES[fam.key].format(cause=cause, **slots)
    if dense:
        p99, jobs, pods = rng.randrange(900, 9000), rng.randrange(200, 5000), rng.randrange(3, 24)
        text += f" Numbers: p99 {p99}ms, {jobs} jobs delayed, {pods} pods restarted, {k * 11}% error peak."
    return text, [first]


def principle_truth(fam: Family | None, confidence: float, phrasing: int = 0) -> dict[str, Any]:
    """The gold principle of a family in one of its phrasings, or the refusal when `fam` is None."""
    if fam is None:
        return {"has_principle": False, "title": "", "principle": "", "concepts": [], "confidence": confidence}
    title, principle = fam.phrasings[phrasing % len(fam.phrasings)]
    return {"has_principle": True, "title": title, "principle": principle, "concepts": fam.concepts,
            "confidence": round(confidence, 2)}


@dataclass
class Timeline:
    """An event timeline with the gold episode facts and what its summary must keep."""

    text: str
    title: str
    summary: str
    concepts: list[str]
    salience: float
    must: list[str]
    people: list[str]

    def __post_init__(self) -> None:
        assert len(self.title) <= 60 and len(self.summary) <= 120, (self.title, self.summary)


def incident(rng: random.Random, ending: str) -> Timeline:
    """An incident from alert to fix; `ending` is "resolved" or "rolled_back" (the adversarial twins)."""
    proj = rng.choice(PROJECTS)
    path, func = pick_file(rng, proj)
    cr = rng.choice(proj.crashes)
    (a, _), (b, _) = people(rng, 2)
    when = day(rng)
    inc, err, line, pr = rng.randrange(100, 999), rng.randrange(6, 40), rng.randrange(40, 400), rng.randrange(100, 900)
    h = short_hash(rng)
    ver, prev = f"{rng.randrange(1, 4)}.{rng.randrange(0, 20)}.{rng.randrange(1, 9)}", ""
    prev = ver.rsplit(".", 1)[0] + "." + str(int(ver.rsplit(".", 1)[1]) - 1)
    mins = sorted(rng.sample(range(2, 70), 6))
    t = lambda m: f"{(when.hour * 60 + when.minute + m) // 60 % 24:02d}:{(when.minute + m) % 60:02d}"
    ref = f"{basename(path)}:{line}"
    lines = [f"INC-{inc} · {proj.service} · {when:%a %-d %b %Y}",
             f"{t(0)}  Grafana alert: {proj.service} 5xx rate {err}% (threshold 2%)",
             f"{t(mins[0])}  {a} acked, paging {b}",
             f"{t(mins[1])}  {b}: all errors come from {func}: {cr.error.splitlines()[0]}",
             f"{t(mins[2])}  {b}: root cause at {path}:{line}, {cr.cause}",
             f"{t(mins[3])}  {a} merged fix {h} (#{pr})",
             f"{t(mins[4])}  deploy {ver} to prod finished"]
    if ending == "resolved":
        lines.append(f"{t(mins[5])}  5xx back under 0.5%, incident resolved after {mins[5]} min")
        summary = f"{proj.service} 5xx at {err}% from {ref}; fix {h} shipped, resolved in {mins[5]} min."
        must, sal = [proj.service, ref, str(mins[5])], 0.7
    else:
        still = rng.randrange(4, 30)
        lines.append(f"{t(mins[5])}  5xx still at {still}% after the deploy; rolled back to {prev}, "
                     "incident stays open")
        summary = f"{proj.service} 5xx at {err}% from {ref}; fix {h} did not help ({still}%), rolled back to {prev}."
        must, sal = [proj.service, ref, str(still), prev], 0.85
    return Timeline("\n".join(lines), f"INC-{inc}: {proj.service} 5xx from {func}", summary,
                    ["incident", cr.concept, proj.name], sal, must, [a, b])


def personal(rng: random.Random) -> Timeline:
    """A day outside work: the out-of-domain timeline."""
    when = day(rng)
    if rng.random() < 0.5:
        boxes, km, house = rng.randrange(30, 90), rng.randrange(10, 60), rng.randrange(2, 400)
        text = (f"{when:%a %-d %b}, moving day\n07:30  van picked up from Hertz, {km} km on the clock\n"
                f"08:15  loading at the old flat, Joost and Femke helping\n"
                f"11:40  fridge doesn't fit the stairwell at Keizersgracht {house}, took the door off its hinges\n"
                f"14:05  all {boxes} boxes in, van back to Hertz by 16:00")
        return Timeline(text, f"Moved into Keizersgracht {house}",
                        f"Moved {boxes} boxes into Keizersgracht {house} with Joost and Femke; fridge needed the door "
                        f"off.", ["moving", "home"], 0.3, ["Keizersgracht", str(boxes)], [])
    flight, delay = f"KL{rng.randrange(1000, 1999)}", rng.randrange(30, 180)
    text = (f"{when:%a %-d %b}, travel to the conference\n06:10  train to Schiphol\n"
            f"07:05  bag drop queue, 40 minutes\n09:45  {flight} to Edinburgh delayed {delay} min, gate D7\n"
            f"13:20  landed, tram into town, checked in at the Balmoral annex")
    return Timeline(text, f"Travel day to Edinburgh on {flight}",
                    f"Flew {flight} to Edinburgh, {delay} min late; checked in at the Balmoral annex.",
                    ["travel", "conference"], 0.25, [flight, "Edinburgh", str(delay)], [])


def terse(rng: random.Random) -> Timeline:
    """Two terse entries: the minimal timeline."""
    proj = rng.choice(PROJECTS)
    _, func = pick_file(rng, proj)
    test = f"test_{func.lower().split('.')[-1].strip('_')}"
    when = day(rng)
    text = f"{when:%H:%M} started on flaky {test}\n{when.hour + 1:02d}:{when.minute:02d} gave up, added a retry"
    return Timeline(text, f"Flaky {test} papered over with a retry",
                    f"Spent an hour on flaky {test} without a root cause; added a retry instead.",
                    ["flaky tests", "retry"], 0.35, [test], [])


def rollout(rng: random.Random) -> Timeline:
    """A canary rollout full of numbers: the dense-number timeline."""
    proj = rng.choice(PROJECTS)
    (a, _), = people(rng, 1)
    when = day(rng)
    ver = f"{rng.randrange(1, 4)}.{rng.randrange(0, 20)}.0"
    base, p1, p2, p3 = (rng.randrange(120, 300) for _ in range(4))
    cpu, pods, rps, err = rng.randrange(40, 90), rng.randrange(6, 30), rng.randrange(2000, 20000), rng.randrange(1, 9)
    t = lambda m: f"{(when.hour * 60 + when.minute + m) // 60 % 24:02d}:{(when.minute + m) % 60:02d}"
    text = (f"{proj.service} {ver} rollout ({a})\n{t(0)}  canary at 5% of traffic\n"
            f"{t(12)}  p99 {p1}ms vs {base}ms baseline, error rate 0.{err}%\n"
            f"{t(30)}  25%: p99 {p2}ms, CPU {cpu}% across {pods} pods\n"
            f"{t(55)}  100%: peak {rps} req/s, p99 {p3}ms\n{t(65)}  rollout done, canary dashboards archived")
    return Timeline(text, f"{proj.service} {ver} canary rollout completed",
                    f"{a} rolled {proj.service} {ver} out 5%->25%->100%; peak {rps} req/s at p99 {p3}ms.",
                    ["rollout", "canary", "performance"], 0.5, [ver, str(rps), str(p3)], [a])
