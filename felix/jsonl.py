"""Reading hand-written JSON-lines files: streamed line by line, strict about keys, errors naming file and line.

Python's json.loads keeps the last of two equal keys in an object without a word, so a field appended to a
request that already had it silently won (or lost). Here a key given twice, at any depth, is an error, as it
is in YAML configs (`felix.yaml_config.safe_load_unique`). Files felix writes itself are read with json.loads.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from felix.errors import FelixError


class DuplicateKeyError(ValueError):
    """A JSON object gives `key` twice."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {json.dumps(key, ensure_ascii=False)}")
        self.key = key


class JsonlError(FelixError):
    """A bad line: `where` (file and line) and `problem` apart, for callers that word the error their way."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: look for the culprit only then
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


class _LongInteger(ValueError):
    def __init__(self, digits: str):
        super().__init__(digits)
        self.digits = digits


def _int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # more digits than sys.get_int_max_str_digits(): Python refuses to convert them
        raise _LongInteger(digits) from None


def loads_strict(text: str | bytes) -> Any:
    """`json.loads`, refusing an object that gives a key twice (DuplicateKeyError, a ValueError). An integer
    longer than Python converts (a degenerate answer repeating digits) is a JSONDecodeError, not the bare
    ValueError json.loads raises for it."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except (json.JSONDecodeError, DuplicateKeyError):
        raise
    except ValueError:  # the long integer: read again to name it
        return _loads_naming_long_integers(text)


def _loads_naming_long_integers(text: str | bytes) -> Any:
    """`loads_strict`'s second read, with a hook that turns an integer Python refuses to convert into a
    JSONDecodeError naming it (one Python call per integer: only on this rare path)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_int=_int)
    except _LongInteger as exc:
        doc = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise json.JSONDecodeError(f"integer of {len(exc.digits.lstrip('-'))} digits, more than the "
                                   f"{sys.get_int_max_str_digits()} Python reads", doc, max(doc.find(exc.digits), 0)
                                   ) from None


def _colon(path: Path) -> Callable[[int], str]:
    return lambda n: f"{path}:{n}"


def text_lines(path: str | Path, where: Callable[[int], str] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed. Lines end at b"\\n" only: str.splitlines() also splits at
    U+2028, U+0085 ..., which JSON strings written with ensure_ascii=False hold unescaped. A byte order mark
    opening the file (Windows editors write one) is dropped. `where(n)` names line n in errors (default
    `path:n`)."""
    path = Path(path)
    where = where or _colon(path)
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    # From 1, as the "column" of an invalid-JSON error counts.
                    raise JsonlError(where(n), f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
                yield n, line.removeprefix("\ufeff") if n == 1 else line
    except OSError as exc:
        raise FelixError(f"{path}: cannot read ({exc.strerror or exc})") from None


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def json_objects(path: str | Path, where: Callable[[int], str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file, streamed; a line that is not UTF-8,
    not JSON, not an object, or gives a key twice is a JsonlError naming file and line."""
    path = Path(path)
    where = where or _colon(path)
    for n, line in text_lines(path, where):
        if not line.strip():
            continue
        try:
            record = loads_strict(line)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith("Unexpected UTF-8 BOM"):  # past line 1: files joined, one BOM each
                raise JsonlError(where(n), "starts with a byte order mark (U+FEFF), which only a file's first "
                                           "line may (were files joined?)") from None
            raise JsonlError(where(n), f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        except DuplicateKeyError as exc:
            raise JsonlError(where(n), str(exc)) from None
        except RecursionError:  # Python's JSON reader recurses once per level of nesting
            raise JsonlError(where(n), "invalid JSON (nested too deeply to read)") from None
        if not isinstance(record, dict):
            raise JsonlError(where(n), f"expected a JSON object, got {_JSON_TYPES.get(type(record), 'a value')}")
        yield n, record
