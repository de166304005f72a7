"""Outputs a careful human grader would score differently from the gate, and inputs that crashed it: degenerate
digits, lone surrogates, "840 ms." ending a sentence, ratings counted as facts, uncitable memory ids, and a
validate file whose ids repeat or leave shipped items out."""

from __future__ import annotations

import json

import pytest

from felix.cli import main
from felix.harvest import judge_task, task_job
from felix.harvest_config import TeacherConfig
from felix.harvest_store import HarvestStore
from felix.jsonl import JsonlError, json_objects, loads_strict
from felix.tasks.gate import Truth, check, sentences
from felix.tasks.parse import ParseError, parse_completion
from felix.tasks.suite import load_set
from felix.teachers import Completion

DEV = load_set("dev")
EPISODE = {"title": "Deploy", "summary": "Rolled back.", "concepts": ["deploy"], "salience": 0.5}


def _item(task: str, category: str = "capture") -> dict:
    return next(it for it in DEV if it["task"] == task and it["category"] == category)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# A degenerate answer repeating one digit: json.loads raised a bare ValueError past 4300 digits (a traceback in
# validate, and a harvest run or survival report stopped by one teacher answer).
LONG_INT = '{"title": "t", "summary": "s", "concepts": ["c"], "salience": ' + "1" * 5000 + "}"


def test_an_integer_too_long_to_read_is_unparseable_not_a_crash():
    raw = "Here: " + LONG_INT
    with pytest.raises(ParseError) as exc:
        parse_completion(raw)
    assert exc.value.reason.startswith(f"invalid JSON at character {raw.index('1111') + 1}: integer of 5000 digits")
    assert check("episode_summarization", "a b c", LONG_INT).codes() == ["unparseable"]
    with pytest.raises(json.JSONDecodeError):
        loads_strict(LONG_INT.encode())
    assert loads_strict('{"a": ' + "1" * 4000 + "}")["a"] == int("1" * 4000)  # within the limit: read as before


def test_validate_names_a_line_holding_an_integer_too_long_to_read(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text('{"task": "episode_summarization", "input": "a b c", "output": ' + LONG_INT + "}\n")
    with pytest.raises(JsonlError, match=r"long\.jsonl:1: invalid JSON \(integer of 5000 digits"):
        list(json_objects(path))
    assert main(["validate", str(path)]) == 2
    assert "long.jsonl:1: invalid JSON (integer of 5000 digits" in capsys.readouterr().err
    raw = _write(tmp_path / "raw.jsonl", [{"task": "episode_summarization", "input": "a b c", "output": LONG_INT}])
    assert main(["validate", raw]) == 1
    assert f"L1 error unparseable: invalid JSON at character {LONG_INT.index('1111') + 1}: integer of 5000 digits" \
        in capsys.readouterr().out


@pytest.mark.parametrize("raw", ['{"title": "\\ud800", "summary": "s", "concepts": ["c"], "salience": 0.5}',
                                 '```json\n{"title": "t", "summary": "s", "concepts": ["ok", "x\\udc00"], '
                                 '"salience": 0.5}\n```',
                                 {**EPISODE, "title": "half an emoji \ud83d"}])
def test_a_lone_surrogate_is_unparseable(raw):
    """Python reads a "\\ud800" escape; UTF-8 cannot encode it, so such an answer passed the gate and then
    broke the harvest store (sqlite) or an export."""
    v = check("episode_summarization", "a b c", raw)
    assert v.codes() == ["unparseable"] and "lone surrogate" in v.findings[0].message
    assert parse_completion('{"title": "\\ud83d\\ude00"}') == {"title": "\U0001f600"}  # a whole pair is text


def test_a_harvested_answer_with_a_lone_surrogate_is_stored_as_malformed(tmp_path):
    it = _item("episode_summarization")
    job = task_job(it, TeacherConfig(name="t", provider="openai", model="m"))
    text = json.dumps({**it["reference"], "title": "x\ud800"})  # ASCII: the escape as a model writes it
    j = judge_task(job, Completion(text, 10, 20, False, "m"))
    with HarvestStore(tmp_path / "h.sqlite") as store:  # as Harvester._record stores it (it raised here)
        store.add(job)
        store.record_answer(job.key, status="ok" if j.ok else "failed", text=text, output=j.output, gate=j.gate,
                            passed=j.passed, reason=j.reason, input_tokens=10, output_tokens=20, cost_usd=0.0,
                            latency_s=0.1)
        assert store.row(job.key)["status"] == "failed"
    assert not j.ok and j.output is None and "lone surrogate" in j.reason


@pytest.mark.parametrize(("text", "n"), [
    ("Latency was 89.45 ms. 407 requests failed.", 2),
    ("p95 rose to 2294 ms. It was capped at 128.", 2),
    ("It took 38 ms. Ms. Lee fixed it. Done.", 3),
    ("Ms. Lee fixed it. Done.", 2),
])
def test_a_period_after_ms_ends_a_sentence_after_a_number(text, n):
    assert len(sentences(text)) == n, sentences(text)


def test_a_retrieval_answer_ending_a_sentence_in_ms_passes():
    it = _item("retrieval_synthesis")
    assert it["id"] == "dev-ret-capture-00"
    answer = ("tidepoold served 5712.54 req/s on /v1/recall, down from 12381.01, with an average latency of "
              "89.45 ms. 407 of 171376 requests were non-2xx.")
    v = check(it["task"], it["input"], {"answer": answer, "cited": ["M2"]}, Truth.of(it))
    assert v.passed, v.findings


def test_a_rating_keeps_no_number_of_the_input():
    """A salience of 0.3 is the answer's own rating: it does not keep the input's "0.3%"."""
    inp = "Canary error rate hit 0.3% so we rolled back"
    out = {**EPISODE, "summary": "Canary error rate rose, so we rolled back.", "salience": 0.3}
    assert "number_dropped" in check("episode_summarization", inp, out, Truth(must_contain=["0.3"])).codes()
    principle = {"has_principle": True, "title": "Cap retries", "principle": "Cap retries.", "concepts": ["retries"],
                 "confidence": 0.7}
    inp = {"memories": [{"id": "M1", "text": "retries hit 12 times"}, {"id": "M2", "text": "retries again"}]}
    v = check("principle_abstraction", inp, principle, Truth(must_not_fabricate=["0.7"]))
    assert "fabricated_entity" not in v.codes()


@pytest.mark.parametrize(("memories", "message"), [
    ([{"id": "mem-1", "text": "The deploy failed: disk full."}], "memories[0].id 'mem-1' must be M followed by digits"),
    ([{"id": "M1", "text": "a"}, {"id": "M1", "text": "b"}], "memories[1].id 'M1' is given twice"),
])
def test_retrieval_memory_ids_must_be_citable(tmp_path, capsys, memories, message):
    """The schema only lets an answer cite M<digits>: a perfect answer citing "mem-1" failed L1."""
    rec = {"task": "retrieval_synthesis", "input": {"question": "Why did the deploy fail?", "memories": memories},
           "output": {"answer": "The deploy failed because the disk was full. Nothing else is known.",
                      "cited": [memories[0]["id"]]}}
    assert main(["validate", _write(tmp_path / "ids.jsonl", [rec])]) == 2
    assert f"ids.jsonl:1: {message}" in capsys.readouterr().err


def test_repeated_ids_and_left_out_shipped_items_are_reported(tmp_path, capsys):
    enc = _item("encoding")
    recs = [{"id": enc["id"], "output": enc["reference"]}, {"id": enc["id"], "output": ""},
            *({"id": it["id"], "output": it["reference"]} for it in DEV[1:-2])]
    path = _write(tmp_path / "ids.jsonl", recs)
    assert main(["validate", path, "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    found = {f["code"]: f for f in rep["dataset"]["findings"]}
    assert found["duplicate_id"]["items"] == [enc["id"]] and found["duplicate_id"]["lines"] == [1, 2]
    assert found["missing_items"]["set"] == "dev" and found["missing_items"]["items"] == [it["id"] for it in DEV[-2:]]
    assert rep["summary"]["items"] == len(recs)  # each line still counts: the findings say so, the rates stay
    encs = [it for it in DEV if it["task"] == "encoding"]
    path = _write(tmp_path / "enc.jsonl", [{"id": it["id"], "output": it["reference"]} for it in encs[1:]])
    assert main(["validate", path, "--task", "encoding"]) == 0
    assert f"missing_items: 1 of the 10 dev items (encoding) are not in the file ({encs[0]['id']})" \
        in capsys.readouterr().out
    full = _write(tmp_path / "full.jsonl", [{"id": it["id"], "output": it["reference"]} for it in DEV])
    assert main(["validate", full, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["dataset"]["findings"] == []
