"""JSON Schemas of the four task outputs: gold references validate, each violation gets its code."""

from __future__ import annotations

import copy

import pytest

from felix.tasks.schemas import SCHEMAS, TASKS, schema_errors
from felix.tasks.suite import load_set


def _reference(task: str, **where) -> dict:
    for it in load_set("dev"):
        if it["task"] == task and all(it.get(k) == v for k, v in where.items()):
            return copy.deepcopy(it["reference"])
    raise AssertionError(f"no dev item for {task} {where}")


def _codes(task: str, obj: dict) -> list[str]:
    return [e.code for e in schema_errors(task, obj)]


def test_task_names_match_tokenizer_task_tokens():
    from felix.tokenizer import TASKS as TOKENIZER_TASKS

    assert TASKS == TOKENIZER_TASKS
    assert set(SCHEMAS) == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_every_shipped_reference_is_schema_valid(task):
    refs = [it["reference"] for name in ("dev", "test") for it in load_set(name) if it["task"] == task]
    assert refs
    for ref in refs:
        assert schema_errors(task, ref) == []


def test_encoding_requires_all_ten_fields():
    ref = _reference("encoding", category="capture")
    assert len(ref) == 10
    for field in ref:
        broken = {k: v for k, v in ref.items() if k != field}
        errs = schema_errors("encoding", broken)
        assert [(e.code, e.path) for e in errs] == [("missing_field", field)]


@pytest.mark.parametrize(("field", "value", "code"), [
    ("gist", "g" * 81, "gist_too_long"),
    ("gist", "   ", "empty_gist"),
    ("salience", 1.2, "salience_out_of_range"),
    ("salience", -0.01, "salience_out_of_range"),
    ("salience", "high", "wrong_type"),
    ("significance", "huge", "bad_enum"),
    ("emotional_tone", "angry", "bad_enum"),
    ("outcome", "done", "bad_enum"),
    ("content", "", "empty_content"),
    ("content", " \n ", "empty_content"),
    ("content", "\u200b\u2060 \ufeff", "empty_content"),  # zero-width characters only
    ("gist", "\u200d", "empty_gist"),
    ("concepts", [], "empty_list"),
])
def test_encoding_violations_have_named_codes(field, value, code):
    ref = _reference("encoding", category="capture")
    ref[field] = value
    assert _codes("encoding", ref) == [code]


def test_encoding_gist_of_exactly_80_chars_is_valid():
    ref = _reference("encoding", category="capture")
    ref["gist"] = "g" * 80
    assert schema_errors("encoding", ref) == []


def test_encoding_nested_structured_concepts_are_checked():
    ref = _reference("encoding", category="capture")
    ref["structured_concepts"]["entities"].append({"name": "Priya", "type": "person"})
    ref["structured_concepts"]["topics"] = "performance"
    ref["extra"] = 1
    last = len(ref["structured_concepts"]["entities"]) - 1
    errs = {(e.code, e.path) for e in schema_errors("encoding", ref)}
    assert errs == {("extra_field", "$"), ("missing_field", f"structured_concepts.entities.{last}.context"),
                    ("wrong_type", "structured_concepts.topics")}


def test_retrieval_schema():
    ref = _reference("retrieval_synthesis", category="capture")
    assert schema_errors("retrieval_synthesis", ref) == []
    assert _codes("retrieval_synthesis", {**ref, "cited": ["memory 1"]}) == ["schema_pattern"]
    assert _codes("retrieval_synthesis", {**ref, "cited": ["M1", "M1"]}) == ["duplicate_items"]
    assert _codes("retrieval_synthesis", {**ref, "answer": " "}) == ["empty_answer"]
    assert _codes("retrieval_synthesis", {"answer": ref["answer"]}) == ["missing_field"]


def test_principle_schema_positive_and_refusal():
    stated = _reference("principle_abstraction", category="capture")
    refusal = _reference("principle_abstraction", category="out_of_domain")
    assert stated["has_principle"] is True and refusal["has_principle"] is False
    assert schema_errors("principle_abstraction", stated) == []
    assert schema_errors("principle_abstraction", refusal) == []


def test_principle_schema_negatives():
    stated = _reference("principle_abstraction", category="capture")
    refusal = _reference("principle_abstraction", category="out_of_domain")
    assert _codes("principle_abstraction", {**stated, "principle": ""}) == ["empty_principle"]
    assert _codes("principle_abstraction", {**stated, "concepts": []}) == ["empty_list"]
    assert _codes("principle_abstraction", {**stated, "confidence": 1.5}) == ["confidence_out_of_range"]
    assert _codes("principle_abstraction", {**stated, "has_principle": "yes"}) == ["wrong_type"]
    assert _codes("principle_abstraction", {**refusal, "title": "Something"}) == ["refusal_not_empty"]
    assert _codes("principle_abstraction", {**refusal, "confidence": 0.9}) == ["refusal_confidence_too_high"]


def test_episode_schema():
    ref = _reference("episode_summarization", category="capture")
    assert schema_errors("episode_summarization", ref) == []
    assert _codes("episode_summarization", {**ref, "title": "t" * 61}) == ["title_too_long"]
    assert _codes("episode_summarization", {**ref, "summary": "s" * 121}) == ["summary_too_long"]
    assert _codes("episode_summarization", {**ref, "salience": 2}) == ["salience_out_of_range"]
    assert schema_errors("episode_summarization", {**ref, "title": "t" * 60, "summary": "s" * 120}) == []


def test_unknown_task_raises():
    with pytest.raises(KeyError):
        schema_errors("translation", {})


def test_a_damaged_shipped_set_names_file_and_line(tmp_path, monkeypatch):
    import felix.tasks.suite as suite
    from felix.errors import FelixError

    (tmp_path / "dev.jsonl").write_text('{"id": "a", "input": "x\u2028y"}\n{"id": "b", oops\n', encoding="utf-8")
    monkeypatch.setattr(suite, "DATA_DIR", tmp_path)
    with pytest.raises(FelixError, match=r"dev.jsonl:2: damaged shipped task set"):
        suite.load_set("dev")
    (tmp_path / "dev.jsonl").write_text('{"id": "a", "input": "x\u2028y"}\n', encoding="utf-8")
    assert suite.load_set("dev") == [{"id": "a", "input": "x\u2028y"}]  # U+2028 inside a string is no line end
