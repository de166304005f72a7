"""Edge cases of the task suite's matching, parsing and gate: versions, trailing zeros, Unicode forms,
hashes inside words, minus signs, deep nesting and repeated braces."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.cli import main
from felix.synth import invented_numbers
from felix.tasks import match
from felix.tasks.gate import Truth, check
from felix.tasks.parse import ParseError, parse_completion

RETRIEVAL_INPUT = {"question": "What happened?", "memories": [{"id": "M1", "text": "avg 38.0ms after deploy 3.16.6"}]}


def _enc_of(content: str) -> dict:
    return {**_encoding("x"), "structured_concepts": {"topics": [], "entities": [], "actions": [], "causality": []},
            "content": content}


def _episode(summary: str) -> dict:
    return {"title": "Rollout of tidepoold", "summary": summary, "concepts": ["rollout"], "salience": 0.5}


def _encoding(person: str) -> dict:
    return {"gist": "Fix shipped", "summary": "s", "content": "c", "narrative": "n", "concepts": ["fix"],
            "structured_concepts": {"topics": [], "entities": [{"name": person, "type": "person", "context": ""}],
                                    "actions": [], "causality": []},
            "significance": "routine", "emotional_tone": "neutral", "outcome": "success", "salience": 0.4}


def test_a_v_prefixed_version_states_the_version():
    assert match.mentions("rolled back to v3.16.5", "3.16.5")
    assert match.numbers("(V2.0) and v8") == {"2.0", "8"}
    # Other letters still hide a number: p99 is not 99, nor is kv3 a 3.
    assert match.numbers("p99 kv3 rev3 x.v2") == set()
    timeline = "12:54  deploy 3.16.6 to prod\n13:02  rolled back to 3.16.5"
    kept = check("episode_summarization", timeline, _episode("Deploy v3.16.6 rolled back to v3.16.5."),
                 Truth(["3.16.6", "3.16.5"], []))
    assert kept.passed, kept.findings
    # The twin that was not rolled back must not name the sibling's version, "v" or not.
    made_up = check("episode_summarization", "12:54  deploy 3.16.6 to prod",
                    _episode("Deploy v3.16.6, rolled back to v3.16.5."), Truth(["3.16.6"], ["3.16.5"]))
    assert "fabricated_entity" in made_up.codes()


def test_a_quantity_with_other_trailing_zeros_is_the_same_value():
    assert match.mentions("average latency 38ms", "38.0") and match.mentions("avg 38 ms", "38.0")
    assert match.mentions("ratio 1.50x", "1.5") and match.mentions("took 12.0 s", "12")
    assert match.mentions("cost $2.50", "2.5") and match.mentions("71.4% hit rate", "71.40")
    assert match.mentions("9421.6 req/s", "9421.60") and match.mentions("0.50 s", "0.5")
    assert not match.mentions("took 380ms", "38.0") and not match.mentions("12.5", "12")
    assert not match.mentions("zip 02139", "2139")
    assert not match.mentions("version 3.16.50", "3.16.5")  # versions stay exact
    twin = check("retrieval_synthesis", RETRIEVAL_INPUT | {"memories": [{"id": "M1", "text": "avg 41.2ms"}]},
                 {"answer": "Average latency was 38ms. That was after the deploy.", "cited": ["M1"]},
                 Truth([], ["38.0"]))
    assert "fabricated_entity" in twin.codes()


def test_a_bare_number_keeps_its_trailing_zeros_as_a_version_does():
    """"Python 3.1" is not Python 3.10, nor numpy 1.2 numpy 1.20: without a unit the zero is a digit."""
    assert not match.mentions("requires Python 3.1", "3.10") and not match.mentions("requires Python 3.10", "3.1")
    assert not match.mentions("pinned numpy 1.2", "1.20") and not match.mentions("ratio 1.50", "1.5")
    assert not match.mentions("the 1.80 release", "1.8")  # a shipped chat's "revisit after the 1.8 release"
    assert not match.mentions("Python 3.1 x86", "3.10") and not match.mentions("Python 3.10b1", "3.1")
    capture = "Bumped to Python 3.10 and numpy 1.20; the build took 41.0 s"
    moved = check("encoding", capture, _enc_of("Bumped to Python 3.1 and numpy 1.2; the build took 41 s"))
    assert moved.codes() == ["number_dropped"], moved.findings
    assert "2 of 3 numbers from the input missing (1.20, 3.10)" in moved.findings[0].message
    kept = check("encoding", capture, _enc_of("Moved to Python 3.10 with numpy 1.20, a 41 s build"))
    assert kept.passed, kept.findings
    twin = check("episode_summarization", "12:54  upgrade to Go 1.2", _episode("Upgraded to Go 1.20."),
                 Truth(["1.2"], ["1.20"]))
    assert twin.codes() == ["number_dropped", "fabricated_entity"]


@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=0, max_value=9))
@settings(max_examples=200, deadline=None)
def test_an_integer_is_never_found_inside_a_longer_one(n, digit):
    assert match.mentions(f"took {n} ms.", str(n))
    assert not match.mentions(f"took {n}{digit} ms", str(n))
    assert not match.mentions(f"took {digit}{n} ms", str(n))
    assert match.mentions(f"took {n}.{'0' * (digit + 1)} ms", str(n))


def test_decomposed_unicode_and_full_width_digits_match():
    nfd, nfc = "Jose\u0301", "Jos\u00e9"
    assert match.mentions(f"{nfd} fixed it", nfc) and match.mentions(f"{nfc} fixed it", nfd)
    assert match.mentions("took １２ms", "12") and match.numbers("３.１６.５") == {"3.16.5"}
    v = check("encoding", f"{nfc} fixed the flaky test", _encoding(f"{nfd} Ruiz"))
    assert "fabricated_person" not in v.codes(), v.findings
    assert check("encoding", f"{nfc} fixed it", _encoding("Owen Ruiz")).codes() == ["fabricated_person"]


def test_a_minus_sign_that_starts_a_number_is_part_of_it():
    assert match.numbers("offset -5 (was -0.5), min \u221240, -1,234 bytes") == {"-5", "-0.5", "-40", "-1234"}
    # a hyphen after a letter or digit joins: ranges, dates, ticket ids; "--5" is a flag
    assert match.numbers("retry 3-5 times on 2024-01-15 for PROJ-12 with --5") == {"3", "5", "2024", "01", "15", "12"}
    assert match.kind("-40") == "number" and match.mentions("fell to -40.0 C", "-40")
    assert not match.mentions("fell to 40 C", "-40") and not match.mentions("fell to -40 C", "40")
    flipped = check("episode_summarization", "12:54  clock skew -3s on node 7, alert fired",
                    _episode("Clock skew of 3s on node 7 fired an alert."), Truth(["-3", "7"], []))
    assert "number_dropped" in flipped.codes()


def test_numbers_in_text_written_without_spaces_are_found():
    # Japanese, Chinese, Korean and Thai put numbers right against words; "p99" and "kv3" still hold none.
    ja = "東京の図書館は1908年に開館し、蔵書は約120万冊です。毎日3,500人が訪れます。"
    assert match.numbers(ja) == {"1908", "120", "3500"}
    assert match.numbers("서울2024년 ราคา100บาท 共计-5度") == {"2024", "100", "-5"}
    assert match.numbers("p99 kv3 x.5") == set()
    # so a rephrasing that states the document's numbers invents none, and one that adds a number does
    table = "| year | books |\n| --- | --- |\n| 1908 | 120万 |\n\nQuestion: visitors?\nAnswer: 3,500"
    assert invented_numbers("table", table, ja) == []
    assert invented_numbers("table", table + " and 4,200 more", ja) == ["4200"]


def test_names_and_hashes_in_text_written_without_spaces_are_found():
    # A name runs into the next word in Japanese and Korean ("田中さん", "김민수가") as numbers do; it was
    # reported dropped, and a person entity named as the input names them fabricated.
    assert match.mentions("田中さんがバグを直した", "田中") and match.mentions("김민수가 버그를 고쳤다", "김민수")
    assert match.mentions("コミットabc1234で修正", "abc1234") and match.mentions("Anaさんが直した", "Ana")
    assert not match.mentions("Anabel fixed it", "Ana") and not match.mentions("see abc1234_old", "abc1234")
    ja = "田中さんがバグを直した"
    assert check("encoding", ja, {**_encoding("田中"), "content": ja}).codes() == []
    assert check("episode_summarization", "10:02 田中さんがデプロイ開始", _episode("田中さんがデプロイ"),
                 Truth(["田中"], [])).codes() == []


def test_a_hex_binary_or_octal_literal_states_no_number_zero():
    # "0x1d" was read as the number 0 followed by letters: every output that wrote the offset another way
    # (29, or left it out) "dropped" a 0 the input never stated.
    assert match.numbers("+0x1d at 0xDEADBEEF, mask 0b1010, mode 0o755") == set()
    assert match.numbers("0 of 3 retries, 0 bytes, 2x faster") == {"0", "3", "2"}


def test_file_line_references_in_text_written_without_spaces_are_found():
    # A file name ran into the CJK words around it: "在reader.py:88中" derived the ref "在reader.py:88", which an
    # output citing reader.py:88 in English never kept, and a CJK output did not keep an English ref.
    zh = "在reader.py:88中发生了KeyError，见src/ingest/parser.ts#L12。"
    assert match.refs(zh) == {"reader.py:88", "parser.ts:12"}
    assert match.refs("データはwriter.go line 7で壊れた") == {"writer.go:7"}
    assert match.mentions("エラーはreader.py:88で起きた", "reader.py:88")
    assert not match.mentions("在myreader.py:88中", "reader.py:88")  # another file, as in English
    enc = {**_encoding("KeyError"), "content": zh}
    assert not {"ref_dropped", "ref_changed"} & set(check("encoding", zh, enc).codes())
    assert "ref_dropped" in check("encoding", zh, {**enc, "content": "在parser.ts#L12中"}).codes()


def test_a_ground_truth_number_with_thousands_separators_is_a_number():
    # Text is read without separators ("185,023" is 185023), so a token written with them is that number:
    # it was matched as a literal name, "185023" did not keep it, and it escaped the 30% number tolerance.
    assert match.kind("185,023") == "number" and match.kind("-1,234.5") == "number"
    assert match.mentions("read 185023 rows", "185,023") and match.mentions("read 185,023 rows", "185,023")
    assert not match.mentions("read 185 rows", "185,023") and match.kind("3,5") == "name"
    nums = ["185,023", "1,200", "7", "12"]
    v = check("episode_summarization", "185,023 rows, 1,200 errors, 7 nodes, 12 min",
              _episode("185023 rows and 1200 errors on 7 nodes"), Truth(nums, []))
    assert v.codes() == [], v.findings  # one of four numbers may drop
    assert check("episode_summarization", "x", _episode("read 1,000 rows"), Truth([], ["1000"])).codes() == [
        "fabricated_entity"]


def test_a_hash_inside_a_word_is_not_the_hash():
    assert not match.mentions("tag vabc1234 was cut", "abc1234")
    assert not match.mentions("see abc1234_old", "abc1234")
    assert match.mentions("commit abc1234.", "abc1234")
    assert match.mentions("commit abc1234ef99d0c1e2f3a4b5c6d7e8f9a0b1c2d3e4", "abc1234")  # its full hash
    assert match.mentions("Commit ABC1234 reverted", "abc1234")


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"a": ' * 100_000, '{"answer": ' + "[" * 5000 + "]" * 5000 + "}",
                                 '{"answer": ' + "[" * 900 + "]" * 900 + ', "cited": []}'])
def test_deeply_nested_completions_are_unparseable_not_a_crash(raw):
    with pytest.raises(ParseError):
        parse_completion(raw)
    assert check("retrieval_synthesis", RETRIEVAL_INPUT, raw).codes() == ["unparseable"]


def test_a_deeply_nested_parsed_output_is_unparseable_not_a_crash():
    deep: list = []
    for _ in range(900):
        deep = [deep]
    v = check("episode_summarization", "deploy 3.16.6", {"title": deep, "summary": "s", "concepts": ["a"],
                                                          "salience": 0.5})
    assert v.codes() == ["unparseable"] and "nested deeper" in v.findings[0].message
    assert parse_completion('chatter {"answer": [[["ok"]]], "cited": []} bye') == {"answer": [[["ok"]]], "cited": []}


def test_validate_names_a_line_nested_too_deeply_to_read(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"task": "encoding", "input": "x", "output": 0})[:-2] + "[" * 5000 + "]" * 5000 + "}\n")
    assert main(["validate", str(path)]) == 2
    assert f"{path}:1: invalid JSON (nested too deeply" in capsys.readouterr().err


@pytest.mark.parametrize(("unit", "times"), [("{", 6000), ("{ ", 6000), ('{"a": {', 6000), ("{ [", 6000),
                                             ("{ x } {", 6000), ("```\n{ ", 400), ("```\n{ x } ", 400)])
def test_repeated_braces_parse_in_linear_time(unit, times):
    # A degenerate answer repeats one token until max_tokens; each brace (and each fence's body) was
    # once rescanned to the end.
    raw = "Here: " + unit * times
    t0 = time.perf_counter()
    with pytest.raises(ParseError):
        parse_completion(raw)
    assert time.perf_counter() - t0 < 1.0


def test_the_answer_after_many_stray_braces_is_still_found():
    answer = {"answer": "It failed. Then it passed.", "cited": ["M1"]}
    assert parse_completion("{ " * 3000 + json.dumps(answer)) == answer
    assert parse_completion("{ x } " * 3000 + json.dumps(answer)) == answer


def test_a_json_fence_after_many_others_still_wins():
    answer = {"answer": "It failed. Then it passed.", "cited": ["M1"]}
    raw = "```\nstep one\n```\n" * 20 + f"```json\n{json.dumps(answer)}\n```"
    assert parse_completion(raw) == answer
    untagged = "```\n{ broken\n```\n" * 20 + f"```\n{json.dumps(answer)}\n```"
    assert parse_completion(untagged) == answer
