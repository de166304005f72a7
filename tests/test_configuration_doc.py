"""docs/configuration.md lists every config key with its type and default as felix/config.py has them: the rows
are generated here from the pydantic models, so a key added, removed or given another default fails until the
page follows. The meanings are the page's own (the models carry comments, not descriptions)."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest

from felix.cli import build_parser
from felix.config import CONFIG_DIR, FelixConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\| `([a-z_]+\.[a-z0-9_]+)` \| (.+?) \| `(.*?)` \| (.*) \|$")


def type_text(annotation: typing.Any) -> str:
    """How the page writes a field's type: `int`, `str or null`, `one of a, b`, `list of str`."""
    if isinstance(annotation, types.UnionType):
        kinds = [k for k in typing.get_args(annotation) if k is not type(None)]
        return " or ".join(type_text(k) for k in kinds) + (" or null" if type(None) in typing.get_args(annotation)
                                                          else "")
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "list of " + type_text(typing.get_args(annotation)[0])
    return annotation.__name__


def default_text(value: typing.Any) -> str:
    """A default as YAML spells it (null, true) and Python prints numbers (0.0003, 1e-05)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def expected_rows() -> dict[str, tuple[str, str]]:
    """`section.key` -> (type, default) of every field of every section of FelixConfig."""
    rows = {}
    for section, field in FelixConfig.model_fields.items():
        for name, info in field.annotation.model_fields.items():
            rows[f"{section}.{name}"] = (type_text(info.annotation), default_text(info.get_default()))
    return rows


def doc_rows() -> dict[str, tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if m := ROW.match(line):
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4).strip())
    return rows


def test_every_config_key_is_documented_with_its_type_and_default():
    expected, documented = expected_rows(), doc_rows()
    missing = [f"| `{k}` | {t} | `{d}` | MEANING |" for k, (t, d) in expected.items() if k not in documented]
    assert not missing, "docs/configuration.md lacks these keys; add the rows:\n" + "\n".join(missing)
    unknown = sorted(set(documented) - set(expected))
    assert not unknown, f"docs/configuration.md names keys felix/config.py does not have: {unknown}"
    wrong = [f"{k}: page says {documented[k][:2]}, config.py has {v}" for k, v in expected.items()
             if documented[k][:2] != v]
    assert not wrong, "\n".join(wrong)
    assert all(meaning for _, _, meaning in documented.values())
    # one table per section, in the order of the models
    assert list(documented) == list(expected)


def test_the_page_names_every_packaged_config():
    text = DOC.read_text(encoding="utf-8")
    for path in CONFIG_DIR.glob("*.yaml"):
        assert f"| `{path.stem}` |" in text, f"docs/configuration.md does not list the packaged config {path.stem}"


def test_the_readme_and_train_help_point_to_the_page(capsys):
    assert "docs/configuration.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    assert "docs/configuration.md" in capsys.readouterr().out
