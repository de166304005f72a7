"""A data mix: named shard sources with target weights, stored as YAML."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from felix.atomic import atomic_write_text
from felix.errors import FelixError
from felix.shards import INDEX, ShardSet
from felix.tokenizer import FelixTokenizer
from felix.yaml_config import format_validation_error, read_yaml_mapping, refuse_bool


class MixSource(BaseModel):
    """One source of a mix: a shard directory and its (unnormalized) sampling weight."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shards: Path  # relative paths resolve against the mix file's directory
    weight: float

    @field_validator("weight", mode="before")
    @classmethod
    def _not_bool(cls, v: object) -> object:
        return refuse_bool(v, float)

    @field_validator("weight")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"weight must be a finite number > 0, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be empty")
        return v


class DataMix(BaseModel):
    """Named shard sources with target weights. YAML: `sources: [{name, shards, weight}, ...]`."""

    model_config = ConfigDict(extra="forbid")

    sources: list[MixSource]
    _path: Path | None = PrivateAttr(None)  # where it was loaded from, for error messages

    @property
    def path(self) -> Path | None:
        """The YAML file this mix was loaded from (None when built in code)."""
        return self._path

    @model_validator(mode="after")
    def _check(self) -> DataMix:
        if not self.sources:
            raise ValueError("a mix needs at least one source")
        names = [s.name for s in self.sources]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"duplicate source names {dupes}")
        if not math.isfinite(sum(s.weight for s in self.sources)):
            # targets() divides by this sum: inf would make every share 0 and the loader divide by zero
            raise ValueError("the weights add up to more than a float holds; scale them down")
        return self

    @classmethod
    def load(cls, path: str | Path) -> DataMix:
        """Read and check a mix file: every source's shard directory must exist."""
        path = Path(path)
        if not path.is_file():
            raise FelixError(f"data mix not found: {path}")
        raw = read_yaml_mapping(path, "a 'sources' list")
        try:
            mix = cls.model_validate(raw)
        except ValidationError as exc:
            raise FelixError(format_validation_error(exc, f"{path}: invalid data mix", cls)) from None
        mix._path = path
        for s in mix.sources:
            if not s.shards.is_absolute():
                s.shards = (path.parent / s.shards).resolve()
            if not (s.shards / INDEX).is_file():
                raise FelixError(f"{path}: source {s.name!r}: no shards at {s.shards} (missing {INDEX})")
        # One shard directory under two names would take the sum of their weights as its share, unseen in the
        # weights, `data audit` and the val loss counting it twice: its weight is the way to give it more.
        seen: dict[Path, str] = {}
        for s in mix.sources:
            if (other := seen.setdefault(s.shards.resolve(), s.name)) != s.name:
                raise FelixError(f"{path}: sources {other!r} and {s.name!r} name the same shard directory "
                                 f"{s.shards}; give it one source, with the weight of both")
        return mix

    def write(self, path: str | Path) -> None:
        """Write the mix as YAML, atomically; shard paths are written as given (relative stays relative)."""
        doc = {"sources": [{"name": s.name, "shards": str(s.shards), "weight": s.weight} for s in self.sources]}
        atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))

    def targets(self) -> dict[str, float]:
        """Target share of samples per source (weights normalized)."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    def open_shards(self, verify: bool = True, share: tuple[int, int] = (0, 1)) -> dict[str, ShardSet]:
        """Each source's ShardSet by name (checksums verified when `verify`, this process's `share` of them:
        `ShardSet.open`)."""
        return {s.name: ShardSet.open(s.shards, verify=verify, share=share) for s in self.sources}

    def validate_against(self, tokenizer: FelixTokenizer | None = None) -> None:
        """Every source must have been tokenized by this very tokenizer (by one and the same tokenizer when
        None: `felix data verify`, which has none, refuses what `felix train` would)."""
        opened = self.open_shards(verify=False)
        first = next(iter(opened))
        sha = tokenizer.sha256 if tokenizer is not None else opened[first].tokenizer_sha256
        than = tokenizer.path if tokenizer is not None else f"source {first!r} ({opened[first].root})"
        for name, shards in opened.items():
            if shards.tokenizer_sha256 != sha:
                raise FelixError(f"{self.path or 'data mix'}: source {name!r} ({shards.root}) was tokenized with a "
                                 f"different tokenizer than {than}")


def checkpoint_mix(ckpt, needed_for: str) -> DataMix:
    """The data mix a checkpoint was trained on (its config's data.mix). A relative path was relative to where
    training ran: failing that, it is looked for beside the checkpoint and in the directories above it (a run
    directory moved with its data). FelixError naming the checkpoint and what the mix is `needed_for`."""
    mix = ckpt.config.data.mix
    if not mix:
        raise FelixError(f"{ckpt.path}: its config names no data mix (data.mix); {needed_for}")
    path = Path(mix)
    if not path.is_file():
        found = next((d / path.name for d in Path(ckpt.path).parents if (d / path.name).is_file()), None)
        if found is None:
            raise FelixError(f"{ckpt.path}: its config's data.mix {mix} is not found (nor a {path.name} beside the "
                             f"checkpoint or above it); {needed_for}: put the mix back, or copy it into the run "
                             f"directory")
        path = found
    return DataMix.load(path)
