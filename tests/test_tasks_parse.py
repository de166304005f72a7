"""Extracting the answer object from raw completions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.tasks.parse import ParseError, parse_completion

_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_objects = st.dictionaries(st.text(max_size=10), _json, min_size=1, max_size=5)
# Chatter a model wraps around its answer; no braces or fences, which would be (broken) answers themselves.
_chatter = st.text(st.characters(blacklist_characters="{}[]`", blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(obj=_objects, before=_chatter, after=_chatter, style=st.sampled_from(["bare", "json_fence", "fence", "tagged"]),
       indent=st.sampled_from([None, 2]))
def test_object_wrapped_in_chatter_parses_back_equal(obj, before, after, style, indent):
    body = json.dumps(obj, indent=indent, ensure_ascii=bool(indent))
    wrapped = {"bare": f"{before}{body}{after}", "json_fence": f"{before}\n```json\n{body}\n```\n{after}",
               "fence": f"{before}\n```\n{body}\n```{after}",
               "tagged": f"<|assistant|>{before} {body} {after}<|end|>"}[style]
    assert parse_completion(wrapped) == obj


@settings(max_examples=50, deadline=None)
@given(obj=_objects)
def test_dict_passes_through_and_bare_json_parses(obj):
    assert parse_completion(obj) is obj
    assert parse_completion(json.dumps(obj)) == obj


def test_braces_inside_strings_do_not_end_the_object():
    raw = 'Here you go: {"gist": "closing } and opening { inside", "n": [1, {"k": "\\"}"}]} Let me know!'
    assert parse_completion(raw) == {"gist": "closing } and opening { inside", "n": [1, {"k": '"}'}]}


def test_first_valid_object_wins_over_broken_ones():
    assert parse_completion('use {placeholders} like {this}, then {"a": 1} and {"b": 2}') == {"a": 1}


def test_json_tagged_fence_preferred_over_other_fences():
    raw = 'Example:\n```\n{"example": true}\n```\nAnswer:\n```json\n{"answer": 1}\n```'
    assert parse_completion(raw) == {"answer": 1}


@pytest.mark.parametrize(("raw", "reason"), [
    ("", "empty completion"),
    ("   \n<|end|>", "empty completion"),
    ("I cannot help with that.", "no JSON object found"),
    ('{"gist": "cut off', "truncated"),
    ('Sure: {"gist": "a", "salience": 0.4', "truncated"),
    ("[1, 2, 3]", "JSON array"),
    ('{"gist": tru}', "invalid JSON"),
    ("```json\n{'gist': 'single quotes'}\n```", "fenced block: invalid JSON"),
    (42, "output is a JSON number"),
    (None, "output is a JSON null, expected an object"),
    ([{"gist": "g"}], "output is a JSON array"),
    (True, "output is a JSON boolean"),
])
def test_failures_say_why(raw, reason):
    with pytest.raises(ParseError) as exc:
        parse_completion(raw)
    assert reason in exc.value.reason


@pytest.mark.parametrize("cut", ["truncated", "trailing_comma"])
def test_broken_answer_is_not_replaced_by_an_object_nested_in_it(cut):
    answer = {"gist": "g", "structured_concepts": {"topics": [{"label": "testing", "path": "eng/testing"}]}}
    body = json.dumps(answer)
    raw = {"truncated": body[:body.index("}") + 1] + ', {"label": "x',
           "trailing_comma": "Here: " + body[:-1] + ", }"}[cut]
    with pytest.raises(ParseError) as exc:
        parse_completion(raw)
    assert ("truncated" if cut == "truncated" else "invalid JSON") in exc.value.reason
    # A stray brace in chatter still hides nothing, and a broken example before the answer is skipped.
    assert parse_completion('so :-{ anyway {"a": {"b": 1}}') == {"a": {"b": 1}}
    assert parse_completion('e.g. {"a": 1,} but really {"a": 2}') == {"a": 2}


@pytest.mark.parametrize("raw", [
    '{"title": "t", "salience": 0.5, "salience": 0.9}',
    'Here you go:\n```json\n{"title": "t", "meta": {"salience": 0.5, "salience": 0.9}}\n```',
    'Sure! {"title": "t", "salience": 0.5, "salience": 0.9} and {"title": "other"}',
])
def test_a_key_given_twice_is_refused_naming_the_key(raw):
    """Python's reader would keep the last "salience" silently; which one the model meant is unknowable."""
    with pytest.raises(ParseError) as exc:
        parse_completion(raw)
    assert exc.value.code == "duplicate_key" and exc.value.reason == 'duplicate key "salience" in the answer'


@pytest.mark.parametrize(("raw", "reason"), [
    ('\n\n  {"title": "x",}', "invalid JSON at character 19:"),  # counted in the completion as given
    ('Sure:\n```json\n{"title": "x",}\n```', "fenced block: invalid JSON at character 29:"),
    ('Here {"a": 1,, } and', "invalid JSON at character 14:"),
    ('  {"title": "x"', "JSON object starting at character 3 is truncated"),
])
def test_places_in_reasons_count_characters_of_the_completion_from_1(raw, reason):
    with pytest.raises(ParseError) as exc:
        parse_completion(raw)
    assert raw[int(reason.split("character ")[1].split()[0].rstrip(":")) - 1] in "{},"
    assert reason in exc.value.reason
