"""Typed configs for `felix harvest` and `felix synth`: teachers, the store, what to ask and how hard to retry.

One YAML file names the teachers once; harvest reads its `items` section, synth its `synth` section.
Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from felix.errors import FelixError
from felix.tasks.schemas import TASKS
from felix.yaml_config import StrictModel, apply_overrides, format_validation_error, read_yaml_mapping

PROVIDERS = ("openai", "anthropic", "gemini")


_Strict = StrictModel


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1e6


class TeacherConfig(_Strict):
    """One teacher: a model behind a provider's API. The key is read from `api_key_env` at run time only."""

    name: str
    provider: Literal["openai", "anthropic", "gemini"]  # openai = any OpenAI-compatible server
    model: str
    base_url: str | None = None  # None: the provider's public endpoint
    api_key_env: str | None = None  # None: no key (local servers)
    mode: Literal["sync", "batch"] = "sync"  # batch: Anthropic Message Batches / Gemini Batch
    rpm: float | None = Field(None, gt=0)  # requests per minute
    tpm: float | None = Field(None, gt=0)  # tokens (in + out) per minute
    concurrency: int = Field(4, ge=1)
    price: Price = Price()
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)  # not sent to anthropic: its current API leaves sampling to the model
    json_mode: bool = False  # ask for a JSON object (openai response_format, gemini response_mime_type)
    timeout: float = Field(120.0, gt=0)  # seconds per request
    batch_poll_seconds: float = Field(30.0, gt=0)
    batch_size: int = Field(5000, ge=1)  # requests per submitted batch (providers cap count and bytes)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip() or any(c in v for c in "/\\ \t"):
            raise ValueError(f"teacher name must be non-empty without spaces or slashes, got {v!r}")
        return v

    @model_validator(mode="after")
    def _batch_provider(self) -> TeacherConfig:
        if self.mode == "batch" and self.provider == "openai":
            raise ValueError("mode: batch needs provider anthropic or gemini")
        if self.json_mode and self.provider == "anthropic":
            raise ValueError("json_mode: the Anthropic Messages API has no JSON mode; leave it off for anthropic")
        return self

    @property
    def identity(self) -> str:
        """What answers are keyed by: renaming a teacher or moving its server does not re-ask it."""
        return f"{self.provider}:{self.model}"

    def api_key(self) -> str | None:
        """The key from the environment, without surrounding whitespace (a pasted key often ends in a newline);
        a clear error when the variable is named but unset, or the key could not go in an HTTP header."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise FelixError(f"teacher {self.name}: environment variable {self.api_key_env} is not set")
        # The SDKs would fail to build the header and report it as a connection error, retried forever. The
        # message names the variable, never the key.
        if not all("!" <= c <= "~" for c in key):
            raise FelixError(f"teacher {self.name}: environment variable {self.api_key_env} holds a key with "
                             "whitespace, control or non-ASCII characters inside it; set it to the key alone")
        return key


class RetryConfig(_Strict):
    """How hard to try: transport retries per attempt, and answered attempts per request."""

    max_retries: int = Field(6, ge=0)  # 429 / 5xx / timeouts / dropped connections, per attempt
    max_attempts: int = Field(3, ge=1)  # answers that were malformed or truncated count here
    backoff_base: float = Field(1.0, ge=0)  # seconds; full jitter over base * 2**retry
    backoff_max: float = Field(60.0, ge=0)
    # a teacher that fails this many requests in a row, every retry, is paused (felix.teacher_breaker); 0: never
    pause_after: int = Field(8, ge=0)
    pause_seconds: float = Field(60.0, gt=0)  # the first pause; each failed probe after one doubles it
    pause_max_seconds: float = Field(1800.0, gt=0)


class ItemSource(_Strict):
    """Task items to ask about: a shipped set, a JSONL file of items, or freshly simulated ones."""

    set: Literal["dev"] | None = None  # the test set is never harvested: it is what models are scored on
    file: Path | None = None
    simulate: dict[str, int] | None = None  # {seed, per_category}

    @model_validator(mode="after")
    def _one(self) -> ItemSource:
        given = [k for k in ("set", "file", "simulate") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"an item source names exactly one of set, file, simulate (got {given or 'none'})")
        if self.simulate is not None and set(self.simulate) - {"seed", "per_category"}:
            raise ValueError("simulate takes {seed, per_category}")
        return self


class HeldoutConfig(_Strict):
    """Validation splits on disk whose documents stay held out: synth neither rephrases them nor mixes them."""

    tokenizer: Path  # the tokenizer.json the shards were written with (checked against their index)
    mixes: list[Path] = []  # data mix YAML files: the val split of every source
    shards: list[Path] = []  # shard directories: their val splits
    # near copies (felix.synth_heldout): word n-grams of this many words; a source document is held out when
    # at least `containment` of the n-grams of it, or of a val document, are the other's
    ngram: int = Field(13, ge=1)
    containment: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _some(self) -> HeldoutConfig:
        if not self.mixes and not self.shards:
            raise ValueError("heldout names no val split: give mixes (data mix YAML files) or shards (directories)")
        return self


class SynthConfig(_Strict):
    """FinePhrase: which documents to rephrase, into which formats, and how to mix the result."""

    sources: list[Path] = []  # .jsonl ({"text"}) or .txt documents; glob patterns expand (`synth_source_files`)
    formats: list[Literal["table", "math", "faq", "tutorial"]] = ["table", "math", "faq", "tutorial"]
    max_documents: int | None = Field(None, ge=1)
    min_chars: int = Field(200, ge=1)  # shorter documents hold too little to rephrase
    max_chars: int = Field(6000, ge=100)  # longer ones are cut at a paragraph, line, sentence or word boundary
    seed: int = 0
    synthetic_share: float = Field(0.5, gt=0, le=1)  # of the mixed source's characters
    # The sources are usually data-mix sources too: their val documents must not be trained on here.
    heldout: HeldoutConfig | None = None

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("formats is empty: name at least one of table, math, faq, tutorial")
        if dupes := sorted({f for f in v if v.count(f) > 1}):
            # each format is asked once per document: a repeat would be counted as requests never made
            raise ValueError(f"formats names {dupes} more than once")
        return v


class HarvestConfig(_Strict):
    """The whole file: teachers, store, retry policy, and what harvest and synth ask."""

    store: Path = Path("harvest.sqlite")
    teachers: list[TeacherConfig]
    retry: RetryConfig = RetryConfig()
    items: list[ItemSource] = []
    tasks: list[str] | None = None  # None: every task
    synth: SynthConfig = SynthConfig()
    base_dir: Path = Path(".")  # set from the file's location; not written in YAML

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        names = [t.name for t in self.teachers]
        if not names:
            raise ValueError("at least one teacher is needed")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"duplicate teacher names {dupes}")
        seen: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            if (j := seen.setdefault(t.identity, i)) != i:
                # Answers are keyed by provider:model, so the second teacher would reuse (and race for) the
                # first one's answers instead of being asked.
                raise ValueError(f"teachers.{i}.model: teachers {self.teachers[j].name!r} and {t.name!r} are "
                                 f"both {t.identity!r}; each teacher needs its own provider:model")
        if self.tasks is not None and (bad := [t for t in self.tasks if t not in TASKS]):
            raise ValueError(f"unknown tasks {bad}; expected some of {list(TASKS)}")
        return self

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir / path

    def synth_source_files(self) -> list[Path]:
        """synth.sources resolved, each glob pattern (`docs/*.txt`, `corpus/**/*.jsonl`) expanded to the files it
        matches, in sorted order; a pattern that matches no file, or a path that is not one, is a FelixError."""
        files: list[Path] = []
        for src in self.synth.sources:
            path = self.resolve(src)
            if any(c in str(src) for c in "*?["):  # a glob pattern
                matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
                if not matched:
                    raise FelixError(f"synth source {str(src)!r} matches no file (pattern {path})")
                files += matched
            elif not path.is_file():
                raise FelixError(f"synth source not found: {path}")
            else:
                files.append(path)
        return list(dict.fromkeys(files))  # a file two patterns match is read once

    @property
    def store_path(self) -> Path:
        return self.resolve(self.store)

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise FelixError(f"no teacher named {name!r}; configured: {', '.join(t.name for t in self.teachers)}")


def load_harvest_config(path: str | Path, overrides: list[str] | None = None) -> HarvestConfig:
    """Read and validate a harvest/synth YAML file, with `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FelixError(f"harvest config not found: {path}")
    raw = read_yaml_mapping(path, "teachers, store, items, ...")
    if "base_dir" in raw:
        raise FelixError(f"{path}: base_dir is set from the file's location and cannot be given")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = HarvestConfig.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise FelixError("invalid harvest config\n" + format_validation_error(exc, str(path), HarvestConfig,
                                                                               overrides)) from None
    return cfg
