"""Extract the JSON answer from a raw completion: bare JSON, a fenced block, or the first balanced
object inside chatter ("Sure! Here is the JSON: {...} Let me know ..."). Failures say why."""

from __future__ import annotations

import json
import re
from typing import Any

# A fence's opening line; its body is searched by brace balance, not up to the next ``` (a string
# value may contain backticks).
_FENCE_OPEN = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n")
# The start of a candidate that is meant as JSON (a stray brace in chatter is not).
_JSON_START = re.compile(r'\{\s*"')
# Chat-template markers a model may echo around its answer.
_MARKERS = re.compile(r"<\|(?:assistant|end|endoftext|user|system|task:[a-z_]+)\|>")


class ParseError(ValueError):
    """The completion holds no usable JSON object; `reason` is one short phrase for reports."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _balanced_end(text: str, start: int, nested: set[int] | None = None) -> int | None:
    """Index one past the `}` closing the object opened at `text[start]`, honouring strings. The
    positions of objects opened inside it (outside strings) are added to `nested`."""
    depth, in_str, escaped = 0, False, False
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
            if c == "{" and depth and nested is not None:
                nested.add(i)
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1 if c == "}" else None
    return None


def _first_object(text: str) -> tuple[dict[str, Any] | None, str]:
    """The first `{...}` in `text` that is a balanced, valid JSON object, or why there is none."""
    last_error = "no JSON object found"
    # Objects nested in a broken answer (truncated, or a trailing comma) are fragments of it, such as
    # one topic of an encoding, not the answer. Only a candidate that starts like JSON hides its insides,
    # so a stray brace in chatter does not hide the answer after it.
    skip: set[int] = set()
    for m in re.finditer(r"\{", text):
        if m.start() in skip:
            continue
        nested: set[int] = set()
        end = _balanced_end(text, m.start(), nested)
        looks_json = _JSON_START.match(text, m.start()) is not None
        if end is None:
            if last_error == "no JSON object found":
                last_error = f"unbalanced braces: JSON object starting at char {m.start()} is truncated"
            if looks_json:
                skip |= nested
            continue
        try:
            value = json.loads(text[m.start():end])
        except json.JSONDecodeError as exc:
            last_error = f"invalid JSON at char {m.start() + exc.pos}: {exc.msg}"
            if looks_json:
                skip |= nested
            continue
        if isinstance(value, dict):
            return value, ""
    return None, last_error


def parse_completion(raw: Any) -> dict[str, Any]:
    """The answer object of a completion. `raw` may already be a parsed dict (returned as is) or a
    string. Raises ParseError with a reason when nothing usable is found."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ParseError(f"output is a JSON {type(raw).__name__}, expected an object or a completion string")
    if not _MARKERS.sub(" ", raw).strip():
        raise ParseError("empty completion")
    # Markers hold no braces, so the search below steps over them; stripping them from the text
    # would also rewrite string values that happen to contain one.
    text = raw.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        raise ParseError("completion is a JSON array, expected an object")
    # Fenced blocks first (a json-tagged one wins), then the whole text.
    opened = [(m.group(1), text[m.end():]) for m in _FENCE_OPEN.finditer(text)]
    fences = sorted(opened, key=lambda f: f[0].lower() != "json")
    reason = ""
    for _, body in fences:
        obj, why = _first_object(body)
        if obj is not None:
            return obj
        reason = reason or f"fenced block: {why}"
    obj, why = _first_object(text)
    if obj is not None:
        return obj
    if text.count("```") % 2 == 1 and not reason:
        why = f"unclosed code fence; {why}"
    raise ParseError(reason or why)
