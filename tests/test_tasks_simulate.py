"""The simulator and the shipped sets: deterministic, consistent ground truth, byte-identical files."""

from __future__ import annotations

import difflib
import json
from collections import Counter

import pytest

from felix.tasks import match
from felix.tasks.gate import input_text
from felix.tasks.prompts import PROMPT_VERSION
from felix.tasks.schemas import TASKS
from felix.tasks.simulate import CATEGORIES, simulate
from felix.tasks.suite import DATA_DIR, FIELDS, SETS, build_set, load_set, render_jsonl, render_prompt
from felix.tasks.world import ROSTER

SHIPPED = {name: load_set(name) for name in SETS}
ALL = SHIPPED["dev"] + SHIPPED["test"]


@pytest.mark.parametrize("name", sorted(SETS))
def test_shipped_sets_regenerate_byte_identical(name):
    assert (DATA_DIR / f"{name}.jsonl").read_bytes() == render_jsonl(build_set(name)).encode("utf-8")


@pytest.mark.parametrize("task", TASKS)
def test_simulator_is_deterministic_per_seed(task):
    for cat in CATEGORIES:
        a = [(d.item, d.truth) for d in simulate(task, cat, 99, 2)]
        b = [(d.item, d.truth) for d in simulate(task, cat, 99, 2)]
        c = [(d.item, d.truth) for d in simulate(task, cat, 100, 2)]
        assert a == b
        assert [x[0]["input"] for x in a] != [x[0]["input"] for x in c]


def test_sizes_and_coverage():
    assert {n: len(items) for n, items in SHIPPED.items()} == {"dev": 40, "test": 80}
    for items in SHIPPED.values():
        cells = Counter((it["task"], it["category"]) for it in items)
        assert set(cells) == {(t, c) for t in TASKS for c in CATEGORIES}
        assert len(set(cells.values())) == 1  # balanced
        assert all(list(it) == list(FIELDS) for it in items)


def test_ids_unique_and_sets_disjoint():
    ids = [it["id"] for it in ALL]
    assert len(ids) == len(set(ids))
    dev = {json.dumps(it["input"], sort_keys=True) for it in SHIPPED["dev"]}
    test = {json.dumps(it["input"], sort_keys=True) for it in SHIPPED["test"]}
    assert not dev & test


def test_ground_truth_is_consistent_with_the_input():
    for it in ALL:
        text = input_text(it["task"], it["input"])
        for tok in it["must_contain"]:
            # A principle's required token is the lesson's key word, which the memories need not use.
            assert it["task"] == "principle_abstraction" or match.mentions(text, tok), (it["id"], tok)
            assert match.mentions(match.text_of(it["reference"]), tok), (it["id"], tok)
        for tok in it["must_not_fabricate"]:
            assert not match.mentions(text, tok), (it["id"], tok)
        assert len(it["must_not_fabricate"]) >= 2
        assert it["prompt_version"] == PROMPT_VERSION[it["task"]]


def test_people_in_inputs_come_from_the_roster_and_absent_ones_are_listed():
    firsts = {f for f, _ in ROSTER}
    for it in ALL:
        text = input_text(it["task"], it["input"])
        absent = {f for f in firsts if not match.mentions(text, f)}
        assert {t for t in it["must_not_fabricate"] if t in firsts} <= absent


def test_refusals_where_expected():
    for it in ALL:
        ref = it["reference"]
        if it["task"] == "principle_abstraction":
            assert ref["has_principle"] is (not it["expect_refusal"])
        elif it["task"] == "retrieval_synthesis":
            assert (ref["cited"] == []) is it["expect_refusal"]
        else:
            assert not it["expect_refusal"]
    pri = [it for it in ALL if it["task"] == "principle_abstraction"]
    assert all(it["expect_refusal"] for it in pri if it["category"] == "out_of_domain")
    assert 0.2 < sum(it["expect_refusal"] for it in pri) / len(pri) < 0.6


def test_adversarial_twins_are_near_identical_with_different_answers():
    twins = [it for it in ALL if it["category"] == "adversarial_twin"]
    by_id = {it["id"]: it for it in ALL}
    assert twins and all(it["twin_of"] in by_id for it in twins)
    for a in twins:
        b = by_id[a["twin_of"]]
        assert b["twin_of"] == a["id"] and b["task"] == a["task"]
        ta, tb = input_text(a["task"], a["input"]), input_text(b["task"], b["input"])
        assert ta != tb and difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio() > 0.5, a["id"]
        assert a["reference"] != b["reference"]
    outcomes = {it["expect"].get("outcome") for it in twins if it["task"] == "encoding"}
    assert outcomes == {"success", "failure"}


def test_category_properties():
    for it in ALL:
        text = input_text(it["task"], it["input"])
        if it["category"] == "minimal" and it["task"] == "encoding":
            assert len(text.split()) <= 5
        if it["category"] == "dense_number":
            assert len(match.numbers(text)) >= 8, it["id"]
        if it["category"] == "capture" and it["task"] == "encoding":
            assert match.refs(text) and len(text.splitlines()) >= 5


def test_captures_look_like_real_tool_output():
    import random

    from felix.tasks import events

    made = [g(random.Random(f"real/{i}")).capture for g in events.GENERATORS.values() for i in range(30)]
    joined = "\n".join(made)
    for marker in ("commit ", "Author: ", "Review: PR #", "Requests/sec:", "Traceback (most recent call last)",
                   "goroutine ", "[running]:", "    at ", "insertions(+)", "Fixes #"):
        assert marker in joined, marker
    assert len(set(made)) == len(made)


def test_render_prompt_carries_the_input():
    for it in ALL:
        system, user = render_prompt(it)
        assert "JSON" in system
        if isinstance(it["input"], str):
            assert it["input"].strip() in user
        else:
            assert all(f"[{m['id']}] {m['text']}" in user for m in it["input"]["memories"])


def test_corpus_reads_the_dev_set_never_the_test_set():
    from felix.corpus import task_documents
    from felix.tasks.suite import load_set

    def text(v):
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    docs = task_documents()
    assert len(docs) == len(load_set("dev"))
    assert not any(text(item["input"]) in d for item in load_set("test") for d in docs)
