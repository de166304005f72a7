"""Extract the JSON answer from a raw completion: bare JSON, a fenced block, or the first balanced
object inside chatter ("Sure! Here is the JSON: {...} Let me know ..."). Failures say why."""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from typing import Any

from felix.jsonl import DuplicateKeyError, loads_strict

# A fence's opening line; its body is searched by brace balance, not up to the next ``` (a string
# value may contain backticks).
_FENCE_OPEN = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n")
# The start of a candidate that is meant as JSON (a stray brace in chatter is not).
_JSON_START = re.compile(r'\{\s*"')
# Chat-template markers a model may echo around its answer.
_MARKERS = re.compile(r"<\|(?:assistant|end|endoftext|user|system|task:[a-z_]+)\|>")
# No answer nests deeper than a few levels; far deeper input would exhaust the recursion of the JSON
# reader or of the schema check and text walk after it (a RecursionError, not a finding).
_MAX_DEPTH = 64
_TOO_DEEP = f"nested deeper than {_MAX_DEPTH} levels"
_MAX_FENCES = 8
# JSON's names for what a line held ("null", not Python's "NoneType")
_JSON_TYPE_NAMES = {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array"}


class ParseError(ValueError):
    """The completion holds no usable JSON object; `reason` is one short phrase for reports, `code` the
    gate's finding code for it."""

    def __init__(self, reason: str, code: str = "unparseable"):
        super().__init__(reason)
        self.reason, self.code = reason, code


@dataclass(frozen=True)
class _Span:
    """Where the balance scan of one `{` stops: `stop` is one past its `}` (`closed`), past a `]` that
    closes it instead, or the end of the text (truncated). `opens` lists the `{`s (outside strings) of
    the scan that met it, in order; `index` is its own place there, so the objects opened inside it
    are the entries after `index` up to `stop`."""

    stop: int
    closed: bool
    opens: list[int]
    index: int

    def nested(self) -> list[int]:
        return self.opens[self.index + 1:bisect.bisect_left(self.opens, self.stop, lo=self.index + 1)]


def _scan(text: str, start: int, spans: dict[int, _Span]) -> None:
    """Balance-scan from the `{` at `text[start]`, honouring strings, and record the span of every `{`
    it opens outside strings. A scan from any of those would see the same characters in the same
    state, so each `{` is scanned once: repeated braces (a degenerate or truncated answer) stay linear."""
    opens: list[int] = []
    stack: list[int] = []  # indexes into `opens` of open `{`s; -1 for `[`
    in_str = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            if c == "{":
                opens.append(i)
            stack.append(len(opens) - 1 if c == "{" else -1)
        elif c in "}]":
            k = stack.pop()
            if k >= 0:
                spans[opens[k]] = _Span(i + 1, c == "}", opens, k)
            if not stack:
                return
    for k in stack:
        if k >= 0:
            spans[opens[k]] = _Span(len(text), False, opens, k)


def _depth_ok(value: Any) -> bool:
    """Whether `value` nests at most _MAX_DEPTH containers deep (checked without recursion)."""
    todo = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            if d > _MAX_DEPTH:
                return False
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _lone_surrogate(value: dict[str, Any]) -> str | None:
    """Where a key or string of `value` holds a lone surrogate (a JSON "\\ud800" escape without its pair), as a
    ParseError reason, or None. Python's reader accepts one; it is not text: UTF-8 cannot encode it, so the
    answer could not be stored, exported or trained on."""
    todo: list[tuple[Any, str]] = [(value, "")]
    while todo:
        v, path = todo.pop()
        if isinstance(v, dict):
            todo.extend((x, f"{path}.{k}" if path else str(k)) for k, x in v.items())
            strings = list(v)
        elif isinstance(v, list):
            todo.extend((x, f"{path}.{i}" if path else str(i)) for i, x in enumerate(v))
            strings = []
        else:
            strings = [v] if isinstance(v, str) else []
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"{path or '$'}: {s[exc.start:exc.end]!r} at character {exc.start + 1} is a lone surrogate, "
                        "not valid Unicode")
    return None


def _loads(text: str) -> Any:
    """The strict JSON reader (a key given twice is a DuplicateKeyError: which value the model meant is
    unknowable), with nesting too deep for the reader (RecursionError) or for the gate a JSONDecodeError."""
    try:
        value = loads_strict(text)
    except RecursionError:
        raise json.JSONDecodeError(_TOO_DEEP, text, 0) from None
    if not _depth_ok(value):
        raise json.JSONDecodeError(_TOO_DEEP, text, 0)
    return value


def _first_object(text: str, pos: int, spans: dict[int, _Span], lead: int) -> tuple[dict[str, Any] | None, str]:
    """The first `{...}` in `text[pos:]` that is a balanced, valid JSON object, or why there is none. Places
    are characters of the completion as given, from 1, as an editor counts: `text` is it less `lead` leading
    characters. `spans` may be shared by calls on the same text: a scan depends on nothing before it."""
    last_error = "no JSON object found"
    # Objects nested in a broken answer (truncated, or a trailing comma) are fragments of it, such as
    # one topic of an encoding, not the answer. Only a candidate that starts like JSON hides its insides,
    # so a stray brace in chatter does not hide the answer after it.
    skip: set[int] = set()
    for m in re.compile(r"\{").finditer(text, pos):
        start = m.start()
        if start in skip:
            continue
        if start not in spans:
            _scan(text, start, spans)
        span = spans[start]
        looks_json = _JSON_START.match(text, start) is not None
        if not span.closed:
            if last_error == "no JSON object found":
                last_error = f"unbalanced braces: JSON object starting at character {lead + start + 1} is truncated"
            if looks_json:
                skip.update(span.nested())
            continue
        try:
            value = _loads(text[start:span.stop])
        except json.JSONDecodeError as exc:
            last_error = f"invalid JSON at character {lead + start + exc.pos + 1}: {exc.msg}"
            if looks_json:
                skip.update(span.nested())
            continue
        if isinstance(value, dict):
            return value, ""
    return None, last_error


def parse_completion(raw: Any) -> dict[str, Any]:
    """The answer object of a completion. `raw` may already be a parsed dict (returned as is) or a
    string. Raises ParseError with a reason when nothing usable is found, or with code `duplicate_key`
    when the answer gives a key twice."""
    try:
        obj = _parse(raw)
    except DuplicateKeyError as exc:
        raise ParseError(f"{exc} in the answer", "duplicate_key") from None
    if problem := _lone_surrogate(obj):
        raise ParseError(problem)
    return obj


def _parse(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        if not _depth_ok(raw):
            raise ParseError(f"output is {_TOO_DEEP}")
        return raw
    if not isinstance(raw, str):
        kind = _JSON_TYPE_NAMES.get(type(raw), type(raw).__name__)
        raise ParseError(f"output is a JSON {kind}, expected an object or a completion string")
    if not _MARKERS.sub(" ", raw).strip():
        raise ParseError("empty completion")
    # Markers hold no braces, so the search below steps over them; stripping them from the text
    # would also rewrite string values that happen to contain one.
    text = raw.strip()
    lead = len(raw) - len(raw.lstrip())
    try:
        value = _loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        raise ParseError("completion is a JSON array, expected an object")
    # Fenced blocks first (a json-tagged one wins), then the whole text.
    opened = [(m.group(1), m.end()) for m in _FENCE_OPEN.finditer(text)]
    # A real answer has a few fences; a degenerate one repeating "```" must not cost a search per fence
    # (the whole-text search below still finds an object in a fence past the limit).
    fences = sorted(opened, key=lambda f: f[0].lower() != "json")[:_MAX_FENCES]
    reason = ""
    spans: dict[int, _Span] = {}  # shared: each fence's body is a suffix of the text
    for _, body_start in fences:
        obj, why = _first_object(text, body_start, spans, lead)
        if obj is not None:
            return obj
        reason = reason or f"fenced block: {why}"
    obj, why = _first_object(text, 0, spans, lead)
    if obj is not None:
        return obj
    if text.count("```") % 2 == 1 and not reason:
        why = f"unclosed code fence; {why}"
    raise ParseError(reason or why)
