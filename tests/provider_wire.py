"""What each provider's JSON looks like: parsing requests, rendering answers and errors (for provider_servers)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PROTOCOLS = ("openai", "anthropic", "gemini")
FAULTS = ("ok", "400", "401", "429", "500", "overloaded", "timeout", "truncated", "garbage", "kill")


@dataclass
class Request:
    """One completion request as the server saw it (a batch contributes one per item)."""

    path: str
    headers: dict[str, str]  # keys lower-cased: HTTP header names are case-insensitive
    body: dict
    system: str
    user: str
    model: str
    max_tokens: int | None
    fault: str | None = None
    custom_id: str | None = None  # batch items only: Anthropic custom_id / Gemini inline request index or key


def words(text: str) -> int:
    """Deterministic stand-in for a tokenizer: usage counts are whitespace-separated words."""
    return len(text.split())


def echo(request: Request) -> str:
    return f"echo: {request.user}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _text_of(content: Any) -> str:
    """Text of a message content in any of the shapes the three APIs use (string, blocks, parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if "parts" in content:
            return _text_of(content["parts"])
        return content.get("text", "") or ""
    return "\n".join(t for t in (_text_of(c) for c in content) if t)


# ---------------------------------------------------------------------------------------------------------------------
# Per-protocol request parsing and response rendering


def parse_openai(body: dict) -> tuple[str, str, str, int | None]:
    msgs = body.get("messages", [])
    system = "\n".join(_text_of(m.get("content")) for m in msgs if m.get("role") in ("system", "developer"))
    user = "\n".join(_text_of(m.get("content")) for m in msgs if m.get("role") == "user")
    return system, user, body.get("model", ""), body.get("max_completion_tokens", body.get("max_tokens"))


def parse_anthropic(body: dict) -> tuple[str, str, str, int | None]:
    user = "\n".join(_text_of(m.get("content")) for m in body.get("messages", []) if m.get("role") == "user")
    return _text_of(body.get("system")), user, body.get("model", ""), body.get("max_tokens")


def parse_gemini(body: dict, model: str) -> tuple[str, str, str, int | None]:
    # camelCase is what the SDK sends; snake_case is accepted by the real API too.
    system = _text_of(body.get("systemInstruction") or body.get("system_instruction"))
    contents = body.get("contents", [])
    if isinstance(contents, dict):
        contents = [contents]
    user = "\n".join(_text_of(c) for c in contents if c.get("role", "user") == "user")
    config = body.get("generationConfig") or body.get("generation_config") or {}
    return system, user, model, config.get("maxOutputTokens", config.get("max_output_tokens"))


def _openai_response(req: Request, text: str, truncated: bool, n: int) -> dict:
    prompt, completion = words(req.system) + words(req.user), words(text)
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "length" if truncated else "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _anthropic_response(req: Request, text: str, truncated: bool, n: int) -> dict:
    return {
        "id": f"msg_{n:08d}",
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if truncated else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": words(req.system) + words(req.user), "output_tokens": words(text)},
    }


def _gemini_response(req: Request, text: str, truncated: bool, n: int) -> dict:
    prompt, completion = words(req.system) + words(req.user), words(text)
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                        "finishReason": "MAX_TOKENS" if truncated else "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": completion,
                          "totalTokenCount": prompt + completion},
        "modelVersion": req.model,
        "responseId": f"resp-{n}",
    }


RENDER = {"openai": _openai_response, "anthropic": _anthropic_response, "gemini": _gemini_response}

# Error status per fault; Anthropic signals overload with its own 529, the others with 503.
FAULT_STATUS = {"400": 400, "401": 401, "429": 429, "500": 500, "overloaded": 503}
_OPENAI_ERR = {401: ("invalid_request_error", "invalid_api_key"),
               429: ("requests", "rate_limit_exceeded"), 500: ("server_error", None), 503: ("server_error", None),
               404: ("invalid_request_error", "not_found"), 400: ("invalid_request_error", None)}
_ANTHROPIC_ERR = {401: "authentication_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
                  404: "not_found_error", 400: "invalid_request_error"}
_GEMINI_ERR = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
               404: "NOT_FOUND", 400: "INVALID_ARGUMENT"}


def error_body(protocol: str, status: int, message: str) -> dict:
    """The error JSON each provider really sends, so the SDKs parse message/type/code out of it."""
    if protocol == "openai":
        kind, code = _OPENAI_ERR.get(status, ("server_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    if protocol == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_ERR.get(status, "api_error"), "message": message}}
    return {"error": {"code": status, "message": message, "status": _GEMINI_ERR.get(status, "UNKNOWN")}}


# ---------------------------------------------------------------------------------------------------------------------
# HTTP plumbing
