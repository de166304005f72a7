"""`felix validate` in-process: exit codes, readable reasons, the JSON report, errors naming file:line."""

from __future__ import annotations

import json

import pytest

from felix.cli import main
from felix.tasks.suite import corrupt, load_set

DEV = load_set("dev")


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_gold_outputs_as_raw_completions_pass(tmp_path, capsys):
    recs = [{"id": it["id"], "output": f"Here is the JSON you asked for:\n```json\n{json.dumps(it['reference'])}\n```"}
            for it in DEV]
    assert main(["validate", _write(tmp_path / "gold.jsonl", recs), "--json"]) == 0
    rep = _report(capsys)
    assert rep["summary"]["items"] == len(DEV) and rep["summary"]["pass_rate"] == 1.0
    assert rep["summary"]["schema_valid_rate"] == 1.0 and rep["summary"]["fabrication_rate"] == 0.0
    assert all(it["passed"] for it in rep["items"]) and rep["dataset"]["findings"] == []
    assert set(rep["dataset"]["tasks"]) == {it["task"] for it in DEV}


def test_failures_exit_1_with_reasons(tmp_path, capsys):
    enc = next(it for it in DEV if it["task"] == "encoding" and it["category"] == "capture")
    recs = [{"id": enc["id"], "output": corrupt(enc, "long_gist")},
            {"id": enc["id"], "output": corrupt(enc, "fabricate_person")},
            {"id": enc["id"], "output": "Sorry, I can't do that."},
            {"id": enc["id"], "output": enc["reference"]}]
    path = _write(tmp_path / "bad.jsonl", recs)
    assert main(["validate", path, "--json"]) == 1
    rep = _report(capsys)
    codes = [[f["code"] for f in it["findings"]] for it in rep["items"]]
    assert codes == [["gist_too_long"], ["fabricated_entity"], ["unparseable"], []]
    assert [it["line"] for it in rep["items"]] == [1, 2, 3, 4]
    s = rep["summary"]
    assert s["hard_failures"] == 3 and s["pass_rate"] == 0.25 and s["schema_valid_rate"] == 0.5
    assert s["fabrication_rate"] == 0.25 and 0 < s["entity_preservation_rate"] < 1

    assert main(["validate", path]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {path}:1  {enc['id']}" in out and "L1 error gist_too_long: gist: gist is 81 chars (max 80)" in out
    assert "L2 error fabricated_entity" in out and "4 items: 1 passed, 3 failed" in out


def test_input_without_id_and_task_flag(tmp_path, capsys):
    out = {"title": "Deploy of 2.4.1 stalled", "summary": "Deploy 2.4.1 stalled at 40% on 12 pods.",
           "concepts": ["deploy"], "salience": 0.4}
    recs = [{"input": "10:02 deploy 2.4.1 started\n10:30 stalled at 40% on 12 pods", "output": out}]
    path = _write(tmp_path / "epi.jsonl", recs)
    assert main(["validate", path, "--task", "episode_summarization", "--json"]) == 0
    report = _report(capsys)
    assert report["items"][0]["id"] == "line-1" and report["summary"]["dataset_warnings"] == 0
    assert main(["validate", path, "--json"]) == 2  # no task anywhere
    assert "no \"task\"" in capsys.readouterr().err


def test_warnings_do_not_fail(tmp_path, capsys):
    minimal = next(it for it in DEV if it["task"] == "encoding" and it["category"] == "minimal")
    long_out = {**minimal["reference"], "narrative": " ".join(["padding"] * 80)}
    assert main(["validate", _write(tmp_path / "w.jsonl", [{"id": minimal["id"], "output": long_out}])]) == 0
    out = capsys.readouterr().out
    assert "warn  long_output_for_short_input" in out
    # the one item's warning, and the file's: it gives 1 of the 40 dev items (missing_items)
    assert "L3 warn missing_items" in out and "warnings: 1 on items, 1 on the file (L3)" in out


@pytest.mark.parametrize(("content", "message"), [
    ('{"id": "dev-enc-capture-00", "output": {}}\n{"id": ', "bad.jsonl:2: invalid JSON"),
    ('["not", "an", "object"]', "bad.jsonl:1: expected a JSON object"),
    ('{"id": "no-such-item", "output": "{}"}', "bad.jsonl:1: unknown id 'no-such-item'"),
    ('{"task": "encoding", "input": "x"}', "bad.jsonl:1: no \"output\""),
    ('{"task": "poetry", "input": "x", "output": "{}"}', "bad.jsonl:1: unknown task 'poetry'"),
    ('\n\n', "bad.jsonl: no items"),
    ('{"id": "dev-enc-capture-00", "input": "other", "output": "{}"}', "bad.jsonl:1: \"input\" differs"),
    ('{"task": "retrieval_synthesis", "input": {"question": "q", "memories": ["M1 text"]}, "output": "{}"}',
     "bad.jsonl:1: memories[0] must be an object with \"id\" and \"text\" strings"),
    ('{"task": "retrieval_synthesis", "input": "what broke?", "output": "{}"}',
     "bad.jsonl:1: retrieval_synthesis input must be an object"),
    ('{"task": "encoding", "input": ["a capture"], "output": "{}"}', "bad.jsonl:1: encoding input must be a string"),
])
def test_unreadable_input_names_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (b"", "e.jsonl: no items (the file is empty)"),
    (b"\n \n", "e.jsonl: no items (only blank lines)"),
    (b'{"id": "dev-enc-capture-00", "output": {}}\n\xef\xbb\xbf{"id": "x"}\n', "e.jsonl:2: starts with a byte order "
                                                                           "mark (U+FEFF), which only a file's first"),
    (b'{"id": "dev-enc-capture-00", "output": {}}\n{"id": "caf\xe9"}\n', "e.jsonl:2: not valid UTF-8 (byte 12 "),
    (b'{"id": "dev-enc-capture-00", "output": {}}\n\n{"id": "x",}\n', "e.jsonl:3: invalid JSON (Expecting property "
                                                                      "name enclosed in double quotes at column 12)"),
])
def test_empty_or_bad_files_say_what_and_where(tmp_path, capsys, content, message):
    """Lines, columns and bytes count from 1, as an editor shows them."""
    path = tmp_path / "e.jsonl"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "utf-8-sig" not in err


def test_a_completion_giving_a_key_twice_fails_naming_the_key(tmp_path, capsys):
    enc = next(it for it in DEV if it["task"] == "encoding")
    raw = json.dumps(enc["reference"])[:-1] + ', "salience": 0.9}'
    assert main(["validate", _write(tmp_path / "d.jsonl", [{"id": enc["id"], "output": raw}])]) == 1
    assert 'L1 error duplicate_key: duplicate key "salience" in the answer' in capsys.readouterr().out


def test_task_flag_mismatch_and_missing_file(tmp_path, capsys):
    path = _write(tmp_path / "m.jsonl", [{"id": DEV[0]["id"], "output": DEV[0]["reference"]}])
    assert main(["validate", path, "--task", "principle_abstraction"]) == 2
    assert "m.jsonl:1: task 'encoding' differs from --task principle_abstraction" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_outputs_of_the_wrong_shape_fail_without_a_traceback(tmp_path, capsys):
    enc = next(it for it in DEV if it["task"] == "encoding")
    ret = next(it for it in DEV if it["task"] == "retrieval_synthesis")
    recs = [{"id": enc["id"], "output": '{"structured_concepts": [1]}'},
            {"id": enc["id"], "output": {**enc["reference"], "structured_concepts": "x"}},
            {"id": ret["id"], "output": {**ret["reference"], "cited": [{"id": "M1"}]}}]
    assert main(["validate", _write(tmp_path / "shapes.jsonl", recs), "--json"]) == 1
    rep = _report(capsys)
    assert [("wrong_type" in [f["code"] for f in it["findings"]]) for it in rep["items"]] == [True, True, True]
    assert rep["summary"]["schema_valid_rate"] == 0.0


def test_line_separators_inside_strings_do_not_split_lines(tmp_path, capsys):
    # json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 unescaped; str.splitlines() would split there.
    enc = next(it for it in DEV if it["task"] == "encoding")
    out = {**enc["reference"], "narrative": enc["reference"]["narrative"] + " line\u2028separator \x85 next"}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"id": enc["id"], "output": out}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["validate", str(path), "--json"]) == 0
    assert _report(capsys)["summary"]["items"] == 1


def test_preservation_is_not_a_perfect_rate_when_nothing_was_checked(tmp_path, capsys):
    """An input with no number, name or reference to keep: preservation is unmeasured (it read 1.000)."""
    recs = [{"input": "the deploy stalled again", "output": "not JSON at all"}]
    path = _write(tmp_path / "none.jsonl", recs)
    assert main(["validate", path, "--task", "episode_summarization", "--json"]) == 1
    assert _report(capsys)["summary"]["entity_preservation_rate"] is None
    assert main(["validate", path, "--task", "episode_summarization"]) == 1
    assert "entity_preservation_rate n/a" in capsys.readouterr().out
