"""Typed YAML configs, the machinery every felix config file is read with: strict pydantic models, YAML that
refuses a repeated key, dotted `section.key=value` overrides, and validation errors that name the file, the
field and the override at fault."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from felix.errors import FelixError


def refuse_bool(value: Any, annotation: Any) -> Any:
    """`value`, unless it is a boolean for a numeric field: lax pydantic reads true as 1, and YAML 1.1 spells
    true `yes` and `on` too (`max_steps: yes` was a one-step run)."""
    if isinstance(value, bool):
        kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        if bool not in kinds and (int in kinds or float in kinds):
            raise ValueError(f"must be a number, not the boolean {str(value).lower()}")
    return value


class StrictModel(BaseModel):
    """A YAML-read model: unknown keys are errors, and so is a boolean where a number belongs."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool(value, cls.model_fields[info.field_name].annotation)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside Optional, list, dict), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in typing.get_args(annotation) if (m := _submodel(a)) is not None), None)


def closest_key(model: type[BaseModel], loc: tuple[str | int, ...]) -> str | None:
    """The known key nearest to the unknown one at `loc` in `model`, as a dotted path (`train.lr` for
    `train.lrr`); None when none is near."""
    node: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list: the list's model, already taken
            continue
        field = node.model_fields.get(part) if node is not None else None
        node = _submodel(field.annotation) if field is not None else None
        if node is None:
            return None
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1)
    return ".".join(str(p) for p in (*loc[:-1], close[0])) if close else None


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None,
                            overrides: list[str] | None = None) -> str:
    """One `source: field.path: problem` line per pydantic error. An unknown key is said with the nearest known
    one of `model`; an error in a field that one of `overrides` set names that override instead of `source` (the
    file it never came from), and an error in a section one of them changed names both."""
    given = [(parse_override(text)[0], text) for text in overrides or []]
    lines = []
    for err in exc.errors():
        parts = tuple(err["loc"])
        loc = ".".join(str(p) for p in parts) or "(top level)"
        unknown = err["type"] == "extra_forbidden"
        # our validators' messages are whole sentences; pydantic's prefix adds nothing to them
        msg = "unknown key" if unknown else err["msg"].removeprefix("Value error, ")
        if unknown and model is not None and (near := closest_key(model, parts)):
            msg += f"; did you mean {near}?"
        # an override that set the key (or a section holding it); for an unknown key, also one below it: the
        # override made the key up (`trian.lr=...`)
        setter = next((text for path, text in given if tuple(path) == parts[:len(path)]
                       or unknown and tuple(path[:len(parts)]) == parts), None)
        within = [text for path, text in given if len(parts) < len(path) and tuple(path[:len(parts)]) == parts]
        if setter is not None:
            lines.append(f"override {setter}: {msg.replace('unknown key', f'unknown key {loc}', 1)}"
                         if unknown else f"override {setter}: {loc}: {msg}")
        elif within:  # a section's own check, over keys some overrides changed
            lines.append(f"{source} with override{'s' * (len(within) > 1)} {', '.join(within)}: {loc}: {msg}")
        else:
            lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); values are parsed as YAML scalars."""
    if "=" not in text:
        raise FelixError(f"override {text!r} must look like section.key=value")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise FelixError(f"override {text!r} has an empty key")
    try:
        value = safe_load_unique(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise FelixError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a raw config dict (validation happens afterwards)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or a YAML section left empty
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise FelixError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error: PyYAML keeps the last silently, so
    an edit appended below an existing `lr:` was ignored or won without a word, depending on where it went."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may restate keys: that is its point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class names it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} a second time (first on line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """YAML `text` as `yaml.safe_load` reads it, refusing a mapping that repeats a key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: Path, sections: str) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); errors name the file. `sections` says
    what the top level should hold, for the message."""
    try:
        raw = safe_load_unique(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise FelixError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise FelixError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise FelixError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise FelixError(f"{path}: top level must be a mapping ({sections})")
    return raw
