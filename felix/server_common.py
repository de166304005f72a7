"""Pieces the splice server's layers share: request errors and field checks, and generation
parameters/results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """A request the server refuses: HTTP status, a stable error code and a message for the client, and
    the request field at fault (`param`, which OpenAI-style errors report) when there is one."""

    def __init__(self, status: int, code: str, message: str, errors: list[str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.errors, self.param = status, code, message, errors, param


def bad_request(message: str, errors: list[str] | None = None, param: str | None = None) -> ApiError:
    return ApiError(400, "SPLICE_BAD_REQUEST", message, errors, param)


# -- request fields -----------------------------------------------------------------------------
FLOAT32_MAX = 3.4028234663852886e38
def finite_number(v: Any) -> float | None:
    """`v` as a finite float32-sized float, or None if it is not a number (a bool is not) or is out of range."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:  # a JSON integer of hundreds of digits
        return None
    return f if math.isfinite(f) and abs(f) <= FLOAT32_MAX else None


def known_fields(body: dict, route: str, allowed: frozenset[str]) -> None:
    """Refuse a field `route` does not take: ignored, a misspelt one would mean its default (a rollback's
    `id` for `patch_id` rolled back the top patch instead of the one named)."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"{route} takes no field {', '.join(map(repr, unknown))} (its fields: "
                          f"{', '.join(sorted(allowed))})", param=unknown[0])


def number_field(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    f = finite_number(default if v is None else v)
    if f is None or not lo <= f <= hi:
        raise bad_request(f"'{key}' must be a number in [{lo}, {hi}]", param=key)
    return f


def int_field(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad_request(f"'{key}' must be an integer in [{lo}, {hi}]", param=key)
    return v


def json_mode(fmt: Any) -> bool:
    """Whether `response_format` asks for JSON ("json", {"type": "json_object" | "json_schema"})."""
    if fmt is None:
        return False
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind in ("text",):
        return False
    if kind in ("json", "json_object", "json_schema"):
        return True
    raise bad_request("'response_format' must be \"text\", \"json\" or "
                      "{\"type\": \"text\"|\"json_object\"|\"json_schema\"}")


@dataclass
class GenParams:
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ablate: list[int] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no per-token logprobs; k: each token's and its k likeliest rivals'


@dataclass(frozen=True)
class TokenLogprob:
    """A produced token, its log-probability under the untempered distribution, and the `top` likeliest
    tokens at its step as (id, logprob), best first (empty unless asked for)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """Text that became final, and the tokens it releases (with `GenParams.top_logprobs` set): those that
    begin in the text sent so far."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class GenResult:
    text: str
    stop_reason: str  # "stop" (a stop token or string) or "length"
    prompt_tokens: int
    completion_tokens: int
    probs: list[float]
    elapsed_ms: float
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens of `text` (no stop token)


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
