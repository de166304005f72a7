"""Hand-written JSON-lines inputs refuse a key given twice (json.loads kept the last one silently), at any depth,
naming file, line and key; bad bytes and bad JSON are still named by line."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix.cli import main
from felix.corpus import iter_documents
from felix.errors import FelixError
from felix.jsonl import json_objects, loads_strict
from felix.splice_edit import load_requests

REQUEST = '{"prompt": "a", "target": " b"}'


@pytest.mark.parametrize("line, key", [
    ('{"prompt": "a", "target": " b", "target": " c"}', "target"),
    ('{"prompt": "a", "target": " b", "neutral": [{"x": 1, "x": 2}]}', "x"),  # nested: refused before checking
    ('{"prompt": "a", "\\u0070rompt": "b", "target": " c"}', "prompt"),  # equal once the escape is read
])
def test_edit_requests_refuse_a_key_given_twice(tmp_path, line, key):
    path = tmp_path / "e.jsonl"
    path.write_text(f"{REQUEST}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(FelixError, match=rf'e\.jsonl:3: duplicate key "{key}"'):
        load_requests(path)


@pytest.mark.parametrize("line, key", [
    ('{"text": "first", "text": "second"}', "text"),
    ('{"text": "doc", "meta": {"source": "a", "tags": [{"k": 1, "k": 2}]}}', "k"),
])
def test_corpus_records_refuse_a_key_given_twice(tmp_path, line, key):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(FelixError, match=rf'c\.jsonl: line 2: duplicate key "{key}"'):
        list(iter_documents(path))


@pytest.mark.parametrize("line, key", [
    ('{"task": "encoding", "input": "x", "output": "{}", "output": "{\\"gist\\": 1}"}', "output"),
    ('{"task": "encoding", "input": "x", "output": {"gist": "a", "gist": "b"}}', "gist"),
])
def test_validate_refuses_a_key_given_twice(tmp_path, capsys, line, key):
    path = tmp_path / "out.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    assert f'{path}:1: duplicate key "{key}"' in capsys.readouterr().err


def test_harvest_item_files_refuse_a_key_given_twice(tmp_path):
    from felix.harvest import load_items
    from felix.harvest_config import load_harvest_config

    (tmp_path / "items.jsonl").write_text('{"id": "x1", "task": "encoding", "input": "a", "input": "b"}\n',
                                          encoding="utf-8")
    teacher = {"name": "t1", "provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
               "price": {"input": 1.0, "output": 2.0}}
    (tmp_path / "harvest.yaml").write_text(json.dumps({"store": "store.sqlite", "teachers": [teacher],
                                                       "items": [{"file": "items.jsonl"}]}), encoding="utf-8")
    with pytest.raises(FelixError, match=r'items\.jsonl:1: duplicate key "input"'):
        load_items(load_harvest_config(tmp_path / "harvest.yaml"))


def test_a_shipped_set_with_a_key_given_twice_is_damaged(tmp_path, monkeypatch):
    import felix.tasks.suite as suite

    (tmp_path / "dev.jsonl").write_text('{"id": "a"}\n{"id": "b", "id": "c"}\n', encoding="utf-8")
    monkeypatch.setattr(suite, "DATA_DIR", tmp_path)
    with pytest.raises(FelixError, match=r'dev\.jsonl:2: damaged shipped task set \(duplicate key "id"\)'):
        suite.load_set("dev")


def test_bad_bytes_and_bad_json_are_named_by_line(tmp_path, capsys):
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'  \n{"text": "caf\xe9"}\n')  # a blank first line: every reader reaches line 2
    bad_json = tmp_path / "json.jsonl"
    bad_json.write_text('\n\n{"text": "a",}\n', encoding="utf-8")
    with pytest.raises(FelixError, match=r"bytes\.jsonl:2: not valid UTF-8 \(byte 14 of the line\)"):  # 1-based
        load_requests(bad_bytes)
    with pytest.raises(FelixError, match=r"json\.jsonl:3: invalid JSON \(Expecting property name"):
        load_requests(bad_json)
    with pytest.raises(FelixError, match=r"bytes\.jsonl: line 2: not valid UTF-8"):
        list(iter_documents(bad_bytes))
    with pytest.raises(FelixError, match=r"json\.jsonl: line 3: invalid JSON"):
        list(iter_documents(bad_json))
    assert main(["validate", str(bad_bytes)]) == 2  # was "cannot read" without a line
    assert f"{bad_bytes}:2: not valid UTF-8" in capsys.readouterr().err
    assert main(["validate", str(bad_json)]) == 2
    assert f"{bad_json}:3: invalid JSON" in capsys.readouterr().err


def test_lines_are_read_as_they_are_asked_for(tmp_path):
    """A corpus file can be gigabytes: the reader hands out each line before it reads the next."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b", "text": "c"}\n', encoding="utf-8")
    lines = json_objects(path)
    assert next(lines) == (1, {"text": "a"})
    with pytest.raises(FelixError, match=r'c\.jsonl:2: duplicate key "text"'):
        next(lines)


_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
            | st.text() | st.sampled_from(["\u2028", "a\x85b", "\u2029\r"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                             max_size=4),
                       max_leaves=20)
_objects = st.dictionaries(st.text(), _values, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objs=st.lists(_objects, min_size=1, max_size=4), ascii_only=st.booleans())
def test_objects_without_duplicates_round_trip(tmp_path, objs, ascii_only):
    path = tmp_path / "r.jsonl"
    # a blank line after each object: numbering counts it, reading skips it
    path.write_text("".join(json.dumps(o, ensure_ascii=ascii_only) + "\n\n" for o in objs), encoding="utf-8")
    assert list(json_objects(path)) == [(2 * i + 1, o) for i, o in enumerate(objs)]
    assert all(loads_strict(json.dumps(o)) == o for o in objs)
