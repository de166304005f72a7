"""`/v1/chat/completions` requests as a faithful OpenAI-compatible server takes them: every field is
implemented, harmless to ignore, or refused with a 400 naming it, never silently ignored; and the
per-token logprobs of an answer in OpenAI's shape.

Fields (OpenAI's Chat Completions API, openai-python 2.x):
- implemented: messages, model (the served id; omitted means it, as llama.cpp and vLLM take it), n (1),
  max_tokens, max_completion_tokens, temperature, top_p, seed, stop, stream, stream_options
  (include_usage; include_obfuscation is accepted and ignored: no chunk is padded),
  logprobs, top_logprobs, response_format ("text" only: decoding is not constrained, so JSON modes are
  refused; the daemon's /api/v1/complete takes them and says whether the output parses).
- harmless, accepted and ignored (they change no token of the answer): user, safety_identifier,
  metadata, store (nothing is stored), service_tier, prompt_cache_key, prompt_cache_retention,
  prompt_cache_options.
- accepted at their default value only, which is what they do here: frequency_penalty and
  presence_penalty 0, logit_bias {}, modalities ["text"].
- refused when given (not null): tools, tool_choice, functions, function_call, parallel_tool_calls (no
  tool calling), audio, prediction, reasoning_effort, verbosity, web_search_options, moderation.
- any other field: 400 `unknown_parameter`, as OpenAI answers it (a misspelt option fails loudly).
A null value is an unset field (the SDKs send explicit nulls).
"""

from __future__ import annotations

from typing import Any

from felix.server_common import (
    ApiError,
    GenParams,
    TokenLogprob,
    bad_request,
    int_field,
    json_mode,
    number_field,
)
from felix.tokenizer import FelixTokenizer

IMPLEMENTED = {"messages", "model", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "stop", "stream", "stream_options", "logprobs", "top_logprobs", "response_format"}
IGNORED = {"user", "safety_identifier", "metadata", "store", "service_tier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options"}
ONLY_DEFAULT: dict[str, Any] = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
                                "modalities": ["text"]}
REFUSED = {"tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
           "function_call": "function calling", "parallel_tool_calls": "tool calling", "audio": "audio output",
           "prediction": "predicted outputs", "reasoning_effort": "reasoning", "verbosity": "verbosity control",
           "web_search_options": "web search", "moderation": "moderation"}
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token too unlikely to have a finite float logprob


def unsupported(param: str, message: str, code: str = "unsupported_parameter") -> ApiError:
    return ApiError(400, code, message, param=param)


def check_fields(body: dict) -> None:
    """400 for the first field this server does not implement and cannot ignore (module docstring)."""
    for key, value in body.items():
        if key in IMPLEMENTED or key in IGNORED or value is None:
            continue
        if key in ONLY_DEFAULT:
            default = ONLY_DEFAULT[key]
            if isinstance(value, bool) or value != default:
                raise unsupported(key, f"Unsupported value: '{key}' supports only {default!r} here: felix serve "
                                       f"does not implement it", "unsupported_value")
        elif key in REFUSED:
            raise unsupported(key, f"Unsupported parameter: '{key}': felix serve has no {REFUSED[key]}")
        else:
            raise unsupported(key, f"Unknown parameter: '{key}'.", "unknown_parameter")


def check_model(body: dict, model_id: str) -> None:
    """404 `model_not_found` for a model other than the one served, in OpenAI's words."""
    model = body.get("model")
    if model is None or model == model_id:
        return
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    raise ApiError(404, "model_not_found", f"The model `{model}` does not exist or you do not have access to it.")


def chat_params(body: dict, model_id: str, max_seq_len: int) -> tuple[GenParams, bool, bool]:
    """Validate a /v1/chat/completions body, all but its messages: (params, stream, include_usage)."""
    check_fields(body)
    check_model(body, model_id)
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise unsupported("n", "Unsupported value: only n=1 is supported", "unsupported_value")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad_request("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    if json_mode(body.get("response_format")):
        raise unsupported("response_format", "Unsupported value: 'response_format' JSON modes need constrained "
                                             "decoding, which felix serve does not do", "unsupported_value")
    # OpenAI's current name wins over the deprecated one when a client sends both (as vLLM reads them)
    max_tokens = int_field(body, "max_tokens", None, 1, 1 << 20)
    max_tokens = int_field(body, "max_completion_tokens", max_tokens, 1, 1 << 20) or max_seq_len
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"} or \
                not all(isinstance(v, bool) or v is None for v in options.values()):
            raise bad_request("'stream_options' must be {\"include_usage\": bool, \"include_obfuscation\": bool}",
                              param="stream_options")
        include_usage = bool(options.get("include_usage"))
    top = int_field(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if _bool(body, "logprobs"):
        top = top or 0
    elif top is not None:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    p = GenParams(max_tokens=max_tokens, temperature=number_field(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=number_field(body, "top_p", 1.0, 1e-6, 1.0),
                  seed=int_field(body, "seed", None, 0, 2**63 - 1), stop=stop, top_logprobs=top)
    return p, stream, include_usage


def _bool(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"'{key}' must be a boolean", param=key)
    return v


def logprobs_json(tok: FelixTokenizer, steps: list[TokenLogprob]) -> dict:
    """OpenAI's `choices[].logprobs`: per token its text, logprob, UTF-8 bytes and `top_logprobs`. A token
    holding part of a character spells the bytes that are not text as `\\xNN` (as DeepSeek does; `bytes`
    has them exactly)."""

    def entry(tid: int, logprob: float) -> dict:
        raw = tok.token_bytes(tid)
        return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": max(logprob, LOGPROB_FLOOR),
                "bytes": list(raw)}

    return {"content": [entry(s.token, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in steps], "refusal": None}
