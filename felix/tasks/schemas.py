"""JSON Schemas (draft 2020-12) of the four mnemonic task outputs, and L1 validation with reason codes.

Every task answers with one JSON object, retrieval synthesis included: `{answer, cited}` rather than
plain prose, so that (1) one parser and one schema check cover all four tasks, (2) grounding is
checkable by program (each cited id must name a memory that was given), and (3) a refusal is an
explicit, machine-readable state (`cited: []`) instead of a phrase to pattern-match. Schema
validity is the first thing to watch in a small model (brief §6), so the answer format never varies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

TASKS = ("encoding", "retrieval_synthesis", "principle_abstraction", "episode_summarization")

SIGNIFICANCE = ["critical", "important", "notable", "routine", "trivial"]
EMOTIONAL_TONE = ["neutral", "satisfying", "frustrating", "exciting", "concerning"]
OUTCOME = ["success", "failure", "ongoing", "unknown"]
ENUM_FIELDS = {"significance": SIGNIFICANCE, "emotional_tone": EMOTIONAL_TONE, "outcome": OUTCOME}

GIST_MAX = 80
TITLE_MAX = 60
EPISODE_SUMMARY_MAX = 120
# A refusal in principle abstraction carries low confidence: confidence is the strength of support
# for a stated principle, and "nothing generalizes" states none.
REFUSAL_CONFIDENCE_MAX = 0.3

# non-empty, and neither only whitespace nor only zero-width characters (ZWSP, ZWNJ, ZWJ, word joiner, BOM),
# which Python's \s leaves out and which read as nothing
_TEXT = {"type": "string", "pattern": r"[^\s\u200b-\u200d\u2060\ufeff]"}
_ANY_TEXT = {"type": "string"}
_CONCEPTS = {"type": "array", "items": _TEXT, "maxItems": 12}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props), "additionalProperties": False}


ENCODING_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "encoding",
    **_obj({
        "gist": {**_TEXT, "maxLength": GIST_MAX},
        "summary": _TEXT,
        "content": _TEXT,
        "narrative": _TEXT,
        "concepts": {**_CONCEPTS, "minItems": 1},
        "structured_concepts": _obj({
            "topics": {"type": "array", "items": _obj({"label": _TEXT, "path": _TEXT})},
            "entities": {"type": "array", "items": _obj({"name": _TEXT, "type": _TEXT, "context": _ANY_TEXT})},
            "actions": {"type": "array", "items": _obj({"verb": _TEXT, "object": _TEXT, "details": _ANY_TEXT})},
            "causality": {"type": "array", "items": _obj({"relation": _TEXT, "description": _TEXT})},
        }),
        "significance": {"type": "string", "enum": SIGNIFICANCE},
        "emotional_tone": {"type": "string", "enum": EMOTIONAL_TONE},
        "outcome": {"type": "string", "enum": OUTCOME},
        "salience": _UNIT,
    }),
}

RETRIEVAL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "retrieval_synthesis",
    **_obj({
        "answer": _TEXT,  # 2-5 sentences: counted by the gate, JSON Schema cannot
        "cited": {"type": "array", "items": {"type": "string", "pattern": r"^M\d+$"}, "uniqueItems": True},
    }),
}

PRINCIPLE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "principle_abstraction",
    **_obj({
        "has_principle": {"type": "boolean"},
        "title": {**_ANY_TEXT, "maxLength": TITLE_MAX},
        "principle": _ANY_TEXT,
        "concepts": _CONCEPTS,
        "confidence": _UNIT,
    }),
    # A stated principle needs its words; a refusal leaves them empty and stays unconfident.
    "if": {"properties": {"has_principle": {"const": False}}, "required": ["has_principle"]},
    "then": {"properties": {"title": {"maxLength": 0}, "principle": {"maxLength": 0},
                            "confidence": {"maximum": REFUSAL_CONFIDENCE_MAX}}},
    "else": {"properties": {"title": _TEXT, "principle": _TEXT, "concepts": {"minItems": 1}}},
}

EPISODE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "episode_summarization",
    **_obj({
        "title": {**_TEXT, "maxLength": TITLE_MAX},
        "summary": {**_TEXT, "maxLength": EPISODE_SUMMARY_MAX},
        "concepts": {**_CONCEPTS, "minItems": 1},
        "salience": _UNIT,
    }),
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "encoding": ENCODING_SCHEMA,
    "retrieval_synthesis": RETRIEVAL_SCHEMA,
    "principle_abstraction": PRINCIPLE_SCHEMA,
    "episode_summarization": EPISODE_SCHEMA,
}
_VALIDATORS = {t: Draft202012Validator(s) for t, s in SCHEMAS.items()}
for _s in SCHEMAS.values():
    Draft202012Validator.check_schema(_s)


@dataclass(frozen=True)
class SchemaError:
    """One L1 violation: a stable reason code, the JSON path it concerns, and a readable message."""

    code: str
    path: str
    message: str


def _code(validator: str, path: str, field: str) -> str:
    # Named codes for the brief's hard fails; the rest by JSON Schema keyword.
    if validator == "maxLength" and field in ("gist", "title", "summary") and "." not in path:
        return f"{field}_too_long"
    if validator in ("minimum", "maximum") and field in ("salience", "confidence"):
        return f"{field}_out_of_range"
    if validator == "enum":
        return "bad_enum"
    if validator == "pattern" and path == "content":
        return "empty_content"
    if validator == "pattern" and field in ("gist", "title", "summary", "answer", "principle", "narrative"):
        return f"empty_{field}"
    return {"required": "missing_field", "additionalProperties": "extra_field", "type": "wrong_type",
            "minItems": "empty_list", "uniqueItems": "duplicate_items"}.get(validator, f"schema_{validator}")


def schema_errors(task: str, obj: Any) -> list[SchemaError]:
    """Every schema violation of `obj` as the output of `task`, in a stable order."""
    if task not in _VALIDATORS:
        raise KeyError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    out = []
    for err in sorted(_VALIDATORS[task].iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.validator)):
        parts = [str(p) for p in err.absolute_path]
        path = ".".join(parts)
        field = parts[-1] if parts else ""
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else ""
            path, field = ".".join([*parts, missing]), missing
        code = _code(str(err.validator), path, field)
        message = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        if "then" in err.schema_path:  # the refusal branch of principle abstraction
            code = "refusal_confidence_too_high" if field == "confidence" else "refusal_not_empty"
            message = (f"confidence {err.instance} with has_principle=false (max {REFUSAL_CONFIDENCE_MAX})"
                       if field == "confidence" else f"{field} must be empty when has_principle is false")
        elif err.validator == "maxLength":
            message = f"{path} is {len(err.instance)} chars (max {err.validator_value})"
        out.append(SchemaError(code, path or "$", message))
    # Python's json reads NaN and Infinity, which JSON Schema's range checks let through (NaN compares
    # false both ways) and which strict JSON readers downstream reject.
    out.extend(SchemaError("non_finite_number", p or "$", f"{p or '$'} is {v}, not a finite number")
               for p, v in _non_finite(obj, ""))
    return out


def _non_finite(value: Any, path: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{path}.{i}" if path else str(i))
