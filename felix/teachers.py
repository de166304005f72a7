"""Teacher clients: one call shape over the providers' official SDKs.

Each teacher answers `complete(system, user) -> Completion` and raises `TransientError` (worth retrying:
429, 5xx, timeouts, dropped connections, unreadable bodies) or `PermanentError` (bad key, bad
request). The SDKs' own retries are off: the harvest loop owns the retry policy, so every retry is
counted, jittered and honours the server's retry-after. Batch-capable teachers also submit and poll
batches (Anthropic Message Batches, Gemini Batch).
"""

from __future__ import annotations

import email.utils
import ipaddress
import math
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from felix.errors import FelixError
from felix.harvest_config import TeacherConfig

GEMINI_BATCH_ENDED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
                      "JOB_STATE_PARTIALLY_SUCCEEDED"}
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}
# Anthropic stop reasons for an answer cut short: the max_tokens budget, or the context window filling first.
ANTHROPIC_TRUNCATED = {"max_tokens", "model_context_window_exceeded"}
RETRY_AFTER_MAX = 300.0  # seconds: a longer retry-after (a daily quota, a typo) is cut to this
REASON_MAX = 500  # chars of an error text kept in the store
MIN_SECRET_PREFIX = 8  # a key's prefix this long left at the end of a cut text is scrubbed too


@dataclass(frozen=True)
class Completion:
    """A teacher's answer with what it cost in tokens."""

    text: str
    input_tokens: int
    output_tokens: int
    truncated: bool  # stopped by the token limit, not by the model
    model: str
    counted: bool = True  # False: the response carried no token counts, and both counts read 0


@dataclass(frozen=True)
class BatchResult:
    """One request's outcome in a finished batch: a completion, or the provider's error."""

    completion: Completion | None = None
    error: str | None = None


class TeacherError(Exception):
    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class TransientError(TeacherError):
    """Worth retrying after a pause."""


class PermanentError(TeacherError):
    """Retrying the same request cannot help (auth, bad request, unknown model)."""


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), at most RETRY_AFTER_MAX;
    None if absent, unreadable or not finite (the caller then backs off on its own schedule)."""
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            seconds = float(ms) / 1000
        elif (value := headers.get("retry-after")) is None:
            return None
        else:
            try:
                seconds = float(value)
            except ValueError:  # an HTTP date; Python 3.12 raises on anything else, older ones return None
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, AttributeError, OverflowError, IndexError):
        return None
    if not math.isfinite(seconds):  # "1e400" reads as inf, and sleep(inf) raises
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def loopback(base_url: str | None) -> bool:
    """Whether `base_url` names this machine (a local llama.cpp server, `felix serve`)."""
    if not base_url:
        return False
    host = urllib.parse.urlsplit(base_url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _sdk_http_client(sdk: Any, base_url: str | None) -> Any:
    """For a loopback server, an HTTP client that ignores proxy settings: httpx follows http_proxy for
    127.0.0.1 too (no_proxy rarely lists it), sending a local request off the machine. None otherwise."""
    return sdk.DefaultHttpxClient(trust_env=False) if loopback(base_url) else None


def scrub(text: str, secrets: Iterable[str], limit: int = REASON_MAX) -> str:
    """`text` without any secret, cut to `limit` chars. Secrets go before the cut, and a secret's prefix
    of MIN_SECRET_PREFIX+ chars left at the end by the cut (or by the server's own) goes too."""
    secrets = [s for s in secrets if s]
    for s in secrets:
        text = text.replace(s, "[redacted]")
    text = text[:limit]
    for s in secrets:
        for n in range(len(s) - 1, MIN_SECRET_PREFIX - 1, -1):
            if text.endswith(s[:n]):
                text = text[:-n] + "[redacted]"
                break
    return text


def classify_status(status: int, message: str, headers: Any = None) -> TeacherError:
    """An HTTP error status as a transient or permanent teacher error. The reason is not cut here: it is
    scrubbed of keys first (`scrub`), then cut, or a key across the cut would survive in part."""
    reason = f"HTTP {status}: {message}"
    if status in RETRYABLE_STATUS or status >= 500:
        return TransientError(reason, status, parse_retry_after(headers))
    return PermanentError(reason, status)


class Teacher(ABC):
    """A configured model behind one provider's SDK."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    @abstractmethod
    def complete(self, system: str, user: str) -> Completion:
        """One request; raises TransientError or PermanentError."""

    def submit_batch(self, requests: dict[str, tuple[str, str]]) -> str:
        """Submit {custom_id: (system, user)} as one batch; returns the batch id."""
        raise FelixError(f"teacher {self.cfg.name}: provider {self.cfg.provider} has no batch mode")

    def poll_batch(self, batch_id: str) -> dict[str, BatchResult] | None:
        """The batch's results by custom_id once it has ended, else None."""
        raise FelixError(f"teacher {self.cfg.name}: provider {self.cfg.provider} has no batch mode")


def _sdk_errors(exc: Exception) -> TeacherError:
    """Map an exception from the openai or anthropic SDK (same shape) to a teacher error."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        response = getattr(exc, "response", None)
        return classify_status(status, str(getattr(exc, "message", exc)), getattr(response, "headers", None))
    name = type(exc).__name__
    if "Timeout" in name:
        return TransientError(f"timeout: {exc}")
    if "Connection" in name:
        return TransientError(f"connection failed: {exc}")
    return TransientError(f"unreadable response ({name}): {exc}")


class OpenAITeacher(Teacher):
    """Chat Completions on any OpenAI-compatible server (OpenRouter, Together, llama.cpp, `felix serve`)."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)
        import openai

        self._openai = openai
        # The SDK insists on a key; local servers ignore it.
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.api_key() or "no-key", max_retries=0,
                                    timeout=cfg.timeout, http_client=_sdk_http_client(openai, cfg.base_url))

    def complete(self, system: str, user: str) -> Completion:
        try:
            extra = {"response_format": {"type": "json_object"}} if self.cfg.json_mode else {}
            r = self.client.chat.completions.create(
                model=self.cfg.model, max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}], **extra)
        except self._openai.OpenAIError as exc:
            raise _sdk_errors(exc) from None
        except ValueError as exc:  # a body that is not JSON
            raise TransientError(f"unreadable response: {exc}") from None
        # The SDK builds its objects without validating them: a proxy's odd 200 arrives as whatever it sent.
        choices = getattr(r, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise TransientError(f"response has no choices{_error_detail(r)}")
        message = _field(choices[0], "message")
        if message is None:
            raise TransientError("response choice has no message")
        usage = getattr(r, "usage", None)
        return Completion(_content_text(_field(message, "content")), _count(usage, "prompt_tokens"),
                          _count(usage, "completion_tokens"), _field(choices[0], "finish_reason") == "length",
                          _model(r, self.cfg.model), _counted(usage, "prompt_tokens", "completion_tokens"))


class AnthropicTeacher(Teacher):
    """Anthropic Messages, and Message Batches for `mode: batch`."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)
        import anthropic

        self._anthropic = anthropic
        self.client = anthropic.Anthropic(base_url=cfg.base_url, api_key=cfg.api_key() or "no-key", max_retries=0,
                                          timeout=cfg.timeout, http_client=_sdk_http_client(anthropic, cfg.base_url))

    def _params(self, system: str, user: str) -> dict[str, Any]:
        # No temperature: the current Messages API (and SDK) leaves sampling to the model.
        return {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens, "system": system,
                "messages": [{"role": "user", "content": user}]}

    def _completion(self, message: Any) -> Completion:
        content = _field(message, "content")
        if not isinstance(content, list):  # an error body, an HTML page, a message without content
            raise TransientError(f"response has no content{_error_detail(message)}")
        text = _content_text([b for b in content if _field(b, "type") == "text"])
        usage = _field(message, "usage")
        return Completion(text, _count(usage, "input_tokens"), _count(usage, "output_tokens"),
                          _field(message, "stop_reason") in ANTHROPIC_TRUNCATED, _model(message, self.cfg.model),
                          _counted(usage, "input_tokens", "output_tokens"))

    def complete(self, system: str, user: str) -> Completion:
        try:
            return self._completion(self.client.messages.create(**self._params(system, user)))
        except self._anthropic.AnthropicError as exc:
            raise _sdk_errors(exc) from None
        except ValueError as exc:
            raise TransientError(f"unreadable response: {exc}") from None

    def submit_batch(self, requests: dict[str, tuple[str, str]]) -> str:
        try:
            batch = self.client.messages.batches.create(
                requests=[{"custom_id": cid, "params": self._params(s, u)} for cid, (s, u) in requests.items()])
        except self._anthropic.AnthropicError as exc:
            raise _sdk_errors(exc) from None
        except ValueError as exc:
            raise TransientError(f"unreadable response: {exc}") from None
        return batch.id

    def poll_batch(self, batch_id: str) -> dict[str, BatchResult] | None:
        try:
            if self.client.messages.batches.retrieve(batch_id).processing_status != "ended":
                return None
            out = {}
            for r in self.client.messages.batches.results(batch_id):
                if r.result.type == "succeeded":
                    try:
                        out[r.custom_id] = BatchResult(self._completion(r.result.message))
                    except TransientError as exc:  # a malformed item: asked again like any malformed answer
                        out[r.custom_id] = BatchResult(error=exc.reason)
                else:
                    detail = getattr(getattr(r.result, "error", None), "error", None)
                    out[r.custom_id] = BatchResult(error=f"batch {r.result.type}: {getattr(detail, 'message', '')}")
            return out
        except self._anthropic.AnthropicError as exc:
            raise _sdk_errors(exc) from None
        except ValueError as exc:  # a status or results body that is not JSON
            raise TransientError(f"unreadable response: {exc}") from None


class GeminiTeacher(Teacher):
    """Google Gemini generateContent, and the Batch API for `mode: batch`, through the google-genai SDK."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)
        from google import genai
        from google.genai import types

        self._genai, self._types = genai, types
        options = types.HttpOptions(base_url=cfg.base_url, timeout=int(cfg.timeout * 1000))
        self.client = genai.Client(api_key=cfg.api_key() or "no-key", http_options=options)

    def _config(self, system: str) -> Any:
        return self._types.GenerateContentConfig(
            system_instruction=system, max_output_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
            response_mime_type="application/json" if self.cfg.json_mode else None)

    def _completion(self, r: Any) -> Completion:
        cands = r.candidates or []
        if not cands:
            raise TransientError("response has no candidates")
        parts = (cands[0].content.parts if cands[0].content else None) or []
        text = "".join(p.text for p in parts if getattr(p, "text", None))
        finish = str(getattr(cands[0].finish_reason, "value", cands[0].finish_reason) or "")
        usage = r.usage_metadata
        # Thinking tokens are billed (and rate-limited) as output but not counted in candidates_token_count.
        output = (getattr(usage, "candidates_token_count", 0) or 0) + (getattr(usage, "thoughts_token_count", 0) or 0)
        return Completion(text, getattr(usage, "prompt_token_count", 0) or 0, output, finish == "MAX_TOKENS",
                          getattr(r, "model_version", None) or self.cfg.model,
                          _counted(usage, "prompt_token_count", "candidates_token_count"))

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        """One SDK call with its errors as teacher errors: the SDK raises httpx and JSON errors unwrapped."""
        from google.genai import errors

        try:
            return fn(**kwargs)
        except errors.APIError as exc:
            raise classify_status(int(exc.code or 0), str(exc.message or exc),
                                  getattr(getattr(exc, "response", None), "headers", None)) from None
        except Exception as exc:
            if not _is_transport_error(exc):
                raise
            raise _sdk_errors(exc) from None

    def complete(self, system: str, user: str) -> Completion:
        return self._completion(self._call(self.client.models.generate_content, model=self.cfg.model,
                                           contents=user, config=self._config(system)))

    def submit_batch(self, requests: dict[str, tuple[str, str]]) -> str:
        src = [self._types.InlinedRequest(model=self.cfg.model, contents=u, metadata={"key": cid},
                                          config=self._config(s)) for cid, (s, u) in requests.items()]
        return self._call(self.client.batches.create, model=self.cfg.model, src=src).name

    def poll_batch(self, batch_id: str) -> dict[str, BatchResult] | None:
        job = self._call(self.client.batches.get, name=batch_id)
        state = str(getattr(job.state, "value", job.state))
        if state not in GEMINI_BATCH_ENDED:
            return None
        out = {}
        for r in (job.dest.inlined_responses if job.dest else None) or []:
            key = (r.metadata or {}).get("key")
            if key is None:
                continue
            if r.response is not None:
                try:
                    out[key] = BatchResult(self._completion(r.response))
                except TransientError as exc:  # an empty answer: asked again like any malformed one
                    out[key] = BatchResult(error=exc.reason)
            else:
                out[key] = BatchResult(error=f"batch item failed: {getattr(r.error, 'message', None) or state}")
        return out



def _field(obj: Any, name: str) -> Any:
    """A field of an SDK object or of the plain dict the SDK leaves where a body had an unexpected shape."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _count(usage: Any, name: str) -> int:
    n = _field(usage, name)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _counted(usage: Any, *names: str) -> bool:
    """Whether a response's usage block gave any of its token counts."""
    return any(isinstance(_field(usage, n), int) for n in names)


def _model(r: Any, default: str) -> str:
    m = _field(r, "model")
    return m if isinstance(m, str) and m else default


def _content_text(content: Any) -> str:
    """Message content as text: a string, or a list of parts (`{"type": "text", "text": ...}`) joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [p if isinstance(p, str) else _field(p, "text") for p in content]
        return "".join(t for t in texts if isinstance(t, str))
    raise TransientError(f"response content is a {type(content).__name__}, not text")


def _error_detail(body: Any) -> str:
    """What an error body sent with status 200 says, for the reason; else what the body was."""
    err = _field(body, "error")
    msg = _field(err, "message") if err is not None else None
    if isinstance(msg, str):
        return f" (error body: {msg})"
    return f" (got {type(body).__name__})" if isinstance(body, str | bytes) else ""


def _is_transport_error(exc: Exception) -> bool:
    """Timeouts, resets and unreadable bodies from the HTTP stack under an SDK (httpx or its successors)."""
    root = type(exc).__module__.split(".")[0]
    return root.startswith(("httpx", "httpcore")) or isinstance(exc, OSError | ValueError)


PROVIDER_CLASSES: dict[str, type[Teacher]] = {"openai": OpenAITeacher, "anthropic": AnthropicTeacher,
                                              "gemini": GeminiTeacher}


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """The client for a configured teacher; a clear error when its SDK is not installed."""
    try:
        return PROVIDER_CLASSES[cfg.provider](cfg)
    except ImportError as exc:
        pkg = {"openai": "openai", "anthropic": "anthropic", "gemini": "google-genai"}[cfg.provider]
        raise FelixError(f"teacher {cfg.name}: provider {cfg.provider} needs the {pkg} package "
                         f"(pip install 'felix-lm[teachers]'): {exc}") from None
