"""The faithfulness gate (brief §6), run before anything is trained on or scored.

- L1 schema (hard fails): the JSON Schema of the task, plus what a schema cannot say: a placeholder
  gist or title, and 2-5 sentences in a retrieval answer.
- L2 fidelity: the file:line references, names and numbers the ground truth's `must_contain` requires
  (else those derived from the input) survive (up to 30% of the numbers may drop when there are 3 or
  more); nothing in `must_not_fabricate` appears; encoding entities of type person exist in the input;
  retrieval citations name given memories; refusals match the expectation. An L2 error fails the item
  like an L1 error does. A long answer to an input of at most five words is a warning.
- L3 dataset health, over a whole file: duplicate outputs, enum collapse, refusal rates, lengths.

Without ground truth (an input not from the shipped sets), L2 derives what must survive from the
input itself: for encoding every file:line reference and number in it; other tasks condense, so
nothing is required of them beyond the checks that need no ground truth.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from felix.tasks import match
from felix.tasks.parse import ParseError, parse_completion
from felix.tasks.schemas import ENUM_FIELDS, schema_errors

NUMBER_DROP_TOLERANCE = 0.30  # share of numbers that may drop...
NUMBER_DROP_MIN_COUNT = 3  # ...once the input has at least this many
SHORT_INPUT_WORDS = 5
LONG_OUTPUT_WORDS = 60  # warn above this many output words for a short input
SENTENCES = (2, 5)
ENUM_COLLAPSE_SHARE = 0.9  # L3: one enum value on this share of items...
ENUM_COLLAPSE_MIN_ITEMS = 8  # ...among at least this many
REFUSAL_RATE_WARN = 0.6
MISSING = "(missing)"  # L3's label, in an enum's distribution, for outputs that lack the field
_HONORIFICS = {"mr", "ms", "mrs", "dr", "prof"}
_RATINGS = ("salience", "confidence")  # numbers the answer rates itself with, not facts of the input
# A period after one of these ends no sentence.
_ABBREVIATIONS = _HONORIFICS | {"st", "jr", "sr", "vs", "e.g", "i.e", "cf", "approx", "fig"}
# ...except where it is a unit after a number: "p95 was 840 ms. It ..." ends a sentence, "Ms. Lee" does not.
_UNITS = {"ms"}
# A period after one of these, or after an initialism (U.S., a.m.), ends a sentence only before a capital:
# "in the U.S. since 2019" goes on, "pears, etc. Then" ends.
_ENDINGS_BEFORE_A_CAPITAL = {"etc", "inc", "ltd", "co", "corp"}
_INITIALISM = re.compile(r"(?:[a-z]\.)+[a-z]")
_LIST_MARKER = re.compile(r"\d{1,3}")  # "1." alone before the sentence it numbers
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+\S)")
_PLACEHOLDER = re.compile(
    r"^\W*(?:gist|title|summary|todo|tbd|n/?a|none|null|placeholder|untitled|string|text|example|lorem ipsum.*|"
    r"\.\.\.|…|x+|your (?:gist|title) here|<[^>]*>|\{[^}]*\}|\[[^\]]*\])\W*$", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """One reason about an item or a file: level L1/L2/L3, a stable code, error or warn."""

    level: str
    code: str
    message: str
    severity: str = "error"


@dataclass
class Truth:
    """Ground truth for one input (the shipped items carry it; otherwise it is derived)."""

    must_contain: list[str] | None = field(default_factory=list)  # None: derive it from the input
    must_not_fabricate: list[str] = field(default_factory=list)
    expect_refusal: bool | None = None
    expect: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, item: dict[str, Any]) -> Truth | None:
        if not any(k in item for k in ("must_contain", "must_not_fabricate", "expect_refusal", "expect")):
            return None
        # An item that gives only some fields (say `expect`) still has its refs and numbers checked.
        must = item.get("must_contain")
        return cls(None if must is None else list(must), list(item.get("must_not_fabricate") or []),
                   item.get("expect_refusal"), dict(item.get("expect") or {}))


@dataclass
class Verdict:
    """The gate's answer for one item."""

    task: str
    findings: list[Finding] = field(default_factory=list)
    output: dict[str, Any] | None = None
    required: int = 0  # ground-truth tokens checked
    preserved: int = 0  # of which found in the output

    @property
    def parsed(self) -> bool:
        return self.output is not None

    @property
    def schema_valid(self) -> bool:
        return self.parsed and not any(f.level == "L1" for f in self.findings)

    @property
    def fabricated(self) -> bool:
        return any(f.code.startswith("fabricated") or f.code == "unknown_citation" for f in self.findings)

    @property
    def passed(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]


def input_text(task: str, inp: Any) -> str:
    """The text of an input that outputs are checked against."""
    if isinstance(inp, str):
        return inp
    if isinstance(inp, dict):
        return "\n".join([str(inp.get("question", "")), *(str(m.get("text", "")) for m in _memories(inp))])
    return str(inp)


def _memories(inp: dict[str, Any]) -> list[dict[str, Any]]:
    # Callers check input shapes (prompts.input_problem); the gate still never crashes on a bad one.
    mems = inp.get("memories")
    return [m for m in mems if isinstance(m, dict)] if isinstance(mems, list) else []


def derive_must(task: str, text: str) -> list[str]:
    """What must survive when no ground truth is given: encoding keeps every ref and number."""
    if task != "encoding":
        return []
    refs = sorted(match.refs(text))
    ref_lines = {r.rsplit(":", 1)[1] for r in refs}
    return refs + sorted(n for n in match.numbers(text) if n not in ref_lines)


def sentences(text: str) -> list[str]:
    """Sentences split at . ! ? (and closing quotes or brackets) followed by whitespace, whatever starts
    the next one: identifiers like `parse_batch` open sentences too. Punctuation without whitespace
    after it (3.5, foo.py, reader.py:88) never splits, nor does a title or abbreviation (Dr., e.g.); an
    initialism or `etc.` splits only before a capital, `No.` never before a number, and a list's `1.` opens a
    sentence rather than being one."""
    text = text.strip()
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        words = text[start:m.start()].rsplit(None, 2)[-2:] or [""]
        written = words[-1].lstrip("([\"'")
        word = written.lower()
        unit = word in _UNITS and len(words) == 2 and any(c.isdigit() for c in words[0])
        after = text[m.end():].lstrip()[:1]
        if m.group() == "." and word in _ABBREVIATIONS and not unit:
            continue
        ambiguous = word in _ENDINGS_BEFORE_A_CAPITAL or _INITIALISM.fullmatch(word)
        if m.group() == "." and ((ambiguous and not after.isupper()) or (written == "No" and after.isdigit())):
            continue
        if m.group() == "." and _LIST_MARKER.fullmatch(text[start:m.start()].strip()):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def is_refusal(task: str, out: dict[str, Any]) -> bool | None:
    if task == "principle_abstraction":
        return out.get("has_principle") is False
    if task == "retrieval_synthesis":
        return out.get("cited") == []
    return None


def _l1(task: str, out: dict[str, Any]) -> list[Finding]:
    found = [Finding("L1", e.code, f"{e.path}: {e.message}") for e in schema_errors(task, out)]
    for name in ("gist", "title"):
        value = out.get(name)
        refusal = task == "principle_abstraction" and out.get("has_principle") is False
        if isinstance(value, str) and value.strip() and _PLACEHOLDER.match(value.strip()) and not refusal:
            found.append(Finding("L1", f"placeholder_{name}", f"{name} {value!r} is a placeholder"))
    if task == "retrieval_synthesis" and isinstance(out.get("answer"), str) and out["answer"].strip():
        n = len(sentences(out["answer"]))
        if not SENTENCES[0] <= n <= SENTENCES[1]:
            lo, hi = SENTENCES
            found.append(Finding("L1", "sentence_count", f"answer has {n} sentences (want {lo}-{hi})"))
    return found


def _must(task: str, src: str, truth: Truth | None) -> tuple[list[str], str]:
    """The tokens that must survive, and where they come from as a finding says it: the ground truth's
    `must_contain` (which need not be in the input), or derived from the input when it has none."""
    if truth is not None and truth.must_contain is not None:
        return truth.must_contain, "required by the ground truth"
    return derive_must(task, src), "from the input"


def _plural_kept(task: str, kind: str, text: str, tok: str) -> bool:
    """A principle's key word is a common noun ("timeout", "cache"), and a principle stated in the plural
    ("every call needs timeouts") keeps it; names elsewhere stay exact."""
    if task != "principle_abstraction" or kind != "name":
        return False
    plurals = [tok + "s", tok + "es"]
    if len(tok) > 1 and tok[-1] in "yY" and tok[-2].lower() not in "aeiou":  # retry -> retries
        plurals.append(tok[:-1] + "ies")
    return any(match.mentions(text, p) for p in plurals)


def _fidelity(v: Verdict, task: str, inp: Any, truth: Truth | None) -> None:
    out = v.output or {}
    # The answer's own ratings state nothing the input said: a salience of 0.3 keeps no "0.3%" (nor fabricates one).
    stated = {k: x for k, x in out.items() if k not in _RATINGS}
    # Folded (NFC, ASCII digits) once, so a decomposed "José" is the input's composed one everywhere below.
    src, text = match.fold(input_text(task, inp)), match.fold(match.text_of(stated))
    must, origin = _must(task, src, truth)
    nums = [t for t in must if match.kind(t) == "number"]
    lost_nums = [t for t in nums if not match.mentions(text, t)]
    v.required += len(must)
    v.preserved += len(must) - len(lost_nums)
    for tok in must:
        k = match.kind(tok)
        if k == "number" or match.mentions(text, tok) or _plural_kept(task, k, text, tok):
            continue
        v.preserved -= 1
        if k == "ref":
            base = tok.rsplit(":", 1)[0]
            changed = sorted(r for r in match.refs(text) if r.rsplit(":", 1)[0] == base)
            v.findings.append(Finding("L2", "ref_changed", f"{tok} became {', '.join(changed)}") if changed
                              else Finding("L2", "ref_dropped", f"file:line reference {tok} {origin} is missing"))
        else:
            v.findings.append(Finding("L2", f"{k}_dropped", f"{k} {tok!r} {origin} is missing"))
    if lost_nums:
        allowed = int(NUMBER_DROP_TOLERANCE * len(nums)) if len(nums) >= NUMBER_DROP_MIN_COUNT else 0
        if len(lost_nums) > allowed:
            v.findings.append(Finding("L2", "number_dropped", f"{len(lost_nums)} of {len(nums)} numbers {origin} "
                                      f"missing ({', '.join(lost_nums)}); at most {allowed} may drop"))
    for tok in truth.must_not_fabricate if truth is not None else []:
        if match.mentions(text, tok) and not match.mentions(src, tok):
            v.findings.append(Finding("L2", "fabricated_entity", f"{tok!r} is not in the input"))
    # L2 also runs on schema-invalid outputs (to count what survived), so it must take any JSON shape.
    if task == "encoding":
        concepts = out.get("structured_concepts")
        ents = concepts.get("entities") if isinstance(concepts, dict) else None
        for e in ents if isinstance(ents, list) else []:
            if isinstance(e, dict) and str(e.get("type", "")).lower() == "person":
                name = match.fold(str(e.get("name", "")))
                words = [w for w in re.findall(r"[^\W\d_]{2,}", name) if w.lower() not in _HONORIFICS]
                if words and not any(match.mentions(src, w) for w in words):
                    v.findings.append(Finding("L2", "fabricated_person", f"person {name!r} is not in the input"))
    if task == "retrieval_synthesis" and isinstance(inp, dict) and isinstance(out.get("cited"), list):
        # Only string ids can be cited; a memory without one (or with a number) must not crash the sort.
        given = {m["id"] for m in _memories(inp) if isinstance(m.get("id"), str)}
        for c in out["cited"]:
            if isinstance(c, str) and c not in given:  # a non-string id is an L1 error already
                v.findings.append(Finding("L2", "unknown_citation", f"cited {c!r} is not among {sorted(given)}"))
    refused = is_refusal(task, out)
    if truth is not None and truth.expect_refusal is not None and refused is not None:
        if truth.expect_refusal and not refused:
            v.findings.append(Finding("L2", "missed_refusal", "the input supports no answer; expected a refusal"))
        elif refused and not truth.expect_refusal:
            v.findings.append(Finding("L2", "unexpected_refusal", "the input supports an answer; the output refuses"))
    for key, want in (truth.expect.items() if truth is not None else []):
        if out.get(key) != want:
            v.findings.append(Finding("L2", "expected_value", f"{key} is {out.get(key)!r}, expected {want!r}"))
    if match.word_count(src) <= SHORT_INPUT_WORDS and match.word_count(text) > LONG_OUTPUT_WORDS:
        v.findings.append(Finding("L2", "long_output_for_short_input", f"{match.word_count(text)} words for a "
                                  f"{match.word_count(src)}-word input", "warn"))


def check(task: str, inp: Any, output: Any, truth: Truth | None = None) -> Verdict:
    """Parse `output` (a raw completion or an object), then L1 and L2 against `inp` and `truth`."""
    v = Verdict(task)
    try:
        v.output = parse_completion(output)
    except ParseError as exc:
        v.findings.append(Finding("L1", exc.code, exc.reason))
        v.required = len(_must(task, input_text(task, inp), truth)[0])
        return v
    v.findings.extend(_l1(task, v.output))
    _fidelity(v, task, inp, truth)
    return v


def _canonical(out: dict[str, Any]) -> str:
    return json.dumps(out, sort_keys=True, ensure_ascii=False)


def dataset_health(verdicts: list[Verdict], inputs: list[Any], ids: list[str]) -> dict[str, Any]:
    """L3 over a file: findings (each with the items involved), per-task length and refusal stats,
    and the summary rates. Duplicate outputs also add a warning to each item involved."""
    findings: list[dict[str, Any]] = []
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(verdicts):
        # Refusals are meant to look alike; only answers that say something are compared.
        if v.output is not None and not is_refusal(v.task, v.output):
            groups[_canonical(v.output)].append(i)
    for idx in groups.values():
        # Count inputs, not lines: one input answered twice alike (an id on several lines) is no duplicate.
        n_inputs = len({json.dumps(inputs[i], sort_keys=True) for i in idx})
        if n_inputs > 1:
            names = list(dict.fromkeys(ids[i] for i in idx))
            outputs = f" ({len(idx)} outputs)" if len(idx) > n_inputs else ""
            findings.append({"code": "duplicate_output", "items": names,
                             "message": f"{n_inputs} different inputs got the same output{outputs}"})
            for i in idx:
                others = ", ".join(n for n in names if n != ids[i]) or ids[i]
                verdicts[i].findings.append(Finding("L3", "duplicate_output", f"same output as {others}", "warn"))
    by_task: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_task[v.task].append(v)
    stats: dict[str, Any] = {}
    for task, vs in sorted(by_task.items()):
        outs = [v.output for v in vs if v.output is not None]
        lengths = [len(_canonical(o)) for o in outs]
        st: dict[str, Any] = {"items": len(vs), "parsed": len(outs)}
        if lengths:
            st["output_chars"] = {"min": min(lengths), "mean": round(statistics.fmean(lengths), 1),
                                  "median": statistics.median(lengths), "max": max(lengths)}
        refusals = [is_refusal(task, o) for o in outs]
        if outs and refusals[0] is not None:
            st["refusal_rate"] = round(sum(bool(r) for r in refusals) / len(outs), 4)
            if len(outs) >= ENUM_COLLAPSE_MIN_ITEMS and st["refusal_rate"] > REFUSAL_RATE_WARN:
                findings.append({"code": "refusal_rate", "task": task, "message": f"{task}: "
                                 f"{st['refusal_rate']:.0%} of outputs refuse (warn above {REFUSAL_RATE_WARN:.0%})"})
        if task == "encoding":
            st["enums"] = {}
            for name in ENUM_FIELDS:
                # an output without the field (schema-invalid) is counted apart and collapses nothing
                counts = Counter(_enum_label(o, name) for o in outs)
                st["enums"][name] = dict(sorted(counts.items()))
                given = Counter({k: c for k, c in counts.items() if k != MISSING})
                top, n = given.most_common(1)[0] if given else ("", 0)
                if len(outs) >= ENUM_COLLAPSE_MIN_ITEMS and n / len(outs) >= ENUM_COLLAPSE_SHARE:
                    findings.append({"code": "enum_collapse", "task": task, "message":
                                     f"{name} is {top!r} on {n} of {len(outs)} outputs"})
        stats[task] = st
    return {"findings": findings, "tasks": stats, "summary": summary(verdicts)}


def _enum_label(out: dict[str, Any], name: str) -> str:
    """How an output's enum field is counted: its string as given, another JSON value as JSON (`null`), or
    `MISSING`."""
    if name not in out:
        return MISSING
    value = out[name]
    return value if isinstance(value, str) else json.dumps(value)


def summary(verdicts: list[Verdict]) -> dict[str, Any]:
    """The rates a run is judged by (`entity_preservation_rate` is None when no item required a token)."""
    n = len(verdicts) or 1
    required = sum(v.required for v in verdicts)
    return {
        "items": len(verdicts),
        "schema_valid_rate": round(sum(v.schema_valid for v in verdicts) / n, 4),
        # None when no item required any token: nothing was checked, which is no evidence of preservation
        "entity_preservation_rate": round(sum(v.preserved for v in verdicts) / required, 4) if required else None,
        "fabrication_rate": round(sum(v.fabricated for v in verdicts) / n, 4),
        "pass_rate": round(sum(v.passed for v in verdicts) / n, 4),
        "hard_failures": sum(not v.passed for v in verdicts),
        "warnings": sum(f.severity == "warn" for v in verdicts for f in v.findings),
    }
