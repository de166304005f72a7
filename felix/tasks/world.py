"""The simulated software world: a team, three projects (Go, Python, TypeScript) with real-looking
files and functions, and the helpers that render what people capture from it. Everything draws
from a `random.Random` passed in, so a seed fixes every name, number and line."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from typing import Any

# First names are distinct from English words, so a name in an output is a person, not a word.
ROSTER = [("Priya", "Raman"), ("Tomasz", "Kowalczyk"), ("Aiko", "Tanaka"), ("Marcus", "Oyelaran"),
          ("Lena", "Fischer"), ("Diego", "Alvarez"), ("Hannah", "Brooks"), ("Samir", "Haddad"),
          ("Nora", "Lindqvist"), ("Kwame", "Mensah"), ("Ines", "Moreau"), ("Owen", "Gallagher")]


@dataclass(frozen=True)
class Crash:
    """A failure the language can produce: the error line and the source line that raised it."""

    error: str
    code: str
    cause: str  # plain-words cause, for summaries
    concept: str


@dataclass(frozen=True)
class Project:
    name: str
    lang: str
    module: str
    service: str
    files: dict[str, list[str]]
    crashes: list[Crash]
    deps: list[str]


PROJECTS = [
    Project("tidepool", "go", "github.com/tidepool-dev/tidepool", "tidepoold", {
        "internal/agent/consolidate.go": ["consolidateBatch", "mergeEpisodes"],
        "internal/retrieval/spread_activation.go": ["SpreadActivation", "decayWeights"],
        "internal/store/sqlite.go": ["Upsert", "migrate"],
        "internal/api/routes/recall.go": ["handleRecall", "parseRecallQuery"],
    }, [
        Crash("panic: assignment to entry in nil map", "ep.links[id] = w", "a map written before it was allocated",
              "nil map"),
        Crash("panic: runtime error: invalid memory address or nil pointer dereference",
              "return n.parent.weight * decay", "a nil pointer dereference on a node without a parent",
              "nil pointer"),
        Crash("panic: runtime error: index out of range [5] with length 5", "last := batch[len(batch)]",
              "an off-by-one index past the end of a slice", "off-by-one"),
    ], ["SQLite", "Ollama", "Grafana"]),
    Project("larkspur", "python", "larkspur", "larkspur-worker", {
        "larkspur/ingest/reader.py": ["read_batch", "_decode_row"],
        "larkspur/scheduler.py": ["schedule_next", "Backoff.delay"],
        "larkspur/api/routes.py": ["upload_handler", "list_jobs"],
        "larkspur/storage/blob.py": ["put_object", "presign_url"],
    }, [
        Crash("KeyError: 'tenant_id'", 'tenant = raw["tenant_id"]', "rows missing the tenant_id key",
              "missing key"),
        Crash("TypeError: unsupported operand type(s) for +: 'NoneType' and 'int'", "attempt = job.retries + 1",
              "a retry counter that was None for new jobs", "none handling"),
        Crash("ValueError: invalid literal for int() with base 10: ''", 'size = int(headers["content-length"])',
              "an empty Content-Length header", "input validation"),
    ], ["Postgres", "Redis", "Sentry"]),
    Project("wayfarer", "typescript", "wayfarer", "wayfarer-api", {
        "src/server/session.ts": ["refreshSession", "loadUser"],
        "src/checkout/cart.ts": ["applyDiscount", "totalCents"],
        "src/search/indexer.ts": ["reindexBatch", "tokenize"],
    }, [
        Crash("TypeError: Cannot read properties of undefined (reading 'id')", "const uid = session.user.id;",
              "a session whose user had been deleted", "undefined access"),
        Crash("RangeError: Maximum call stack size exceeded", "return tokenize(rest, out);",
              "unbounded recursion on long inputs", "recursion"),
    ], ["Postgres", "Elasticsearch", "Datadog"]),
]

# Captures people keep outside work: the out-of-domain category.
NOTES = [
    ("Dentist moved me to Thu {h}:30, Dr. Okafor, {n} Pine Street, 3rd floor. Bring the insurance card, "
     "copay is ${m}.", ["Okafor", "Pine Street"], "dentist appointment moved", ["health", "appointment"]),
    ("Sourdough attempt #{k}: 500 g flour, {x} g water, 10 g salt. Bulk {h} h at 24C and it overproofed "
     "again. Try {m} min less next time.", [], "sourdough overproofed again", ["baking", "sourdough"]),
    ("Half-marathon in Leiden done: 1:{m}:08, km {k} to {w} were rough. Next up Rotterdam in April, "
     "need {n} km weeks before then.", ["Leiden", "Rotterdam"], "finished the Leiden half-marathon",
     ["running", "race"]),
    ("Landlord (Mr. Verhoeven) says the boiler engineer comes Friday between {h} and 12; hot water out "
     "since Tuesday. Quote was {n} euros.", ["Verhoeven"], "boiler engineer booked for Friday",
     ["home", "repairs"]),
    ("Booked the ferry to Hvar for {k} Aug, {n} euros for two incl. car. Check-in closes {m} min before "
     "departure.", ["Hvar"], "ferry to Hvar booked", ["travel", "booking"]),
]


def people(rng: random.Random, k: int) -> list[tuple[str, str]]:
    """`k` distinct team members."""
    return rng.sample(ROSTER, k)


def absent(rng: random.Random, present: list[str], k: int = 2) -> list[str]:
    """First names of `k` team members not among `present`: what a faithful output never names."""
    pool = [f for f, _ in ROSTER if f not in present]
    return sorted(rng.sample(pool, k))


def hexhash(rng: random.Random, n: int = 40) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def short_hash(rng: random.Random) -> str:
    # At least one letter and one digit, so the short hash is never mistaken for a number.
    while True:
        h = hexhash(rng, 7)
        if any(c.isalpha() for c in h) and any(c.isdigit() for c in h):
            return h


def day(rng: random.Random) -> dt.datetime:
    base = dt.datetime(2026, 1, 5, 9, 0)
    return base + dt.timedelta(days=rng.randrange(0, 300), minutes=rng.randrange(0, 9 * 60), seconds=rng.randrange(60))


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def pick_file(rng: random.Random, proj: Project) -> tuple[str, str]:
    path = rng.choice(sorted(proj.files))
    return path, rng.choice(proj.files[path])


@dataclass
class Event:
    """One simulated happening, with its rendered capture and the ground truth about it.

    `must` lists what an encoding of `capture` has to keep (names, file:line refs as basename:line,
    numbers, short hashes); `truth` holds the encoding facts the gold answer is built from;
    `memory` is the event as a one- or two-sentence stored memory; `question`/`answer`/`answer_must`
    are a retrieval question this memory answers, its gold sentences, and what they must keep.
    """

    kind: str
    capture: str
    memory: str
    must: list[str]
    people: list[str]
    truth: dict[str, Any]
    question: str = ""
    answer: list[str] = field(default_factory=list)
    answer_must: list[str] = field(default_factory=list)
    topic: str = ""
    scope: list[str] = field(default_factory=list)  # project and service names: what makes a memory "about" it


def encoding_truth(gist: str, summary: str, narrative: list[str], concepts: list[str], *,
                   topics: list[tuple[str, str]], entities: list[tuple[str, str, str]],
                   actions: list[tuple[str, str, str]], causality: list[tuple[str, str]],
                   significance: str, tone: str, outcome: str, salience: float) -> dict[str, Any]:
    """The facts of an encoding gold answer, checked against the schema's hard limits here so a
    generator bug fails at build time rather than shipping an invalid reference."""
    assert len(gist) <= 80, gist
    return {
        "gist": gist, "summary": summary, "narrative": " ".join(narrative), "concepts": concepts,
        "structured_concepts": {
            "topics": [{"label": a, "path": b} for a, b in topics],
            "entities": [{"name": a, "type": b, "context": c} for a, b, c in entities],
            "actions": [{"verb": a, "object": b, "details": c} for a, b, c in actions],
            "causality": [{"relation": a, "description": b} for a, b in causality],
        },
        "significance": significance, "emotional_tone": tone, "outcome": outcome, "salience": round(salience, 2),
    }


def stack_trace(proj: Project, path: str, func: str, line: int, crash: Crash, caller: tuple[str, str, int],
                home: str) -> str:
    """A traceback as the project's runtime prints it, innermost frame at `path:line`."""
    cpath, cfunc, cline = caller
    if proj.lang == "python":
        return (f"Traceback (most recent call last):\n"
                f'  File "{home}/{cpath}", line {cline}, in {cfunc}\n'
                f"    result = {func.split('.')[-1]}(payload)\n"
                f'  File "{home}/{path}", line {line}, in {func.split(".")[-1]}\n'
                f"    {crash.code}\n{crash.error}")
    if proj.lang == "go":  # under `go test` the caller is the package's own test, run by testing.tRunner
        pkg = f"{proj.module}/{path.rsplit('/', 1)[0]}"
        test = f"Test{func[:1].upper()}{func[1:]}"
        return (f"--- FAIL: {test} (0.00s)\n{crash.error} [recovered]\n\tpanic: {crash.error.removeprefix('panic: ')}"
                f"\n\ngoroutine {line % 40 + 7} [running]:\n"
                f"testing.tRunner.func1.2({{0x8a1c40, 0xc0001a2f30}})\n"
                f"\t/usr/local/go/src/testing/testing.go:1632 +0x230\n"
                f"{pkg}.{func}(0xc00012a000, {{0xc000118f00, 0x3, 0x4}})\n\t{home}/{path}:{line} +0x1f4\n"
                f"{pkg}.{test}(0xc000103860)\n\t{home}/{path.replace('.go', '_test.go')}:{cline} +0x9c\n"
                f"testing.tRunner(0xc000103860, 0x9d4e88)\n\t/usr/local/go/src/testing/testing.go:1689 +0xfb\n"
                f"created by testing.(*T).Run in goroutine 1\n\t/usr/local/go/src/testing/testing.go:1742 +0x390")
    return (f"{home}/{path}:{line}\n    {crash.code}\n{' ' * 14}^\n\n{crash.error}\n"
            f"    at {func} ({home}/{path}:{line}:19)\n"
            f"    at {cfunc} ({home}/{cpath}:{cline}:12)\n"
            f"    at process.processTicksAndRejections (node:internal/process/task_queues:95:5)")
