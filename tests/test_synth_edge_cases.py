"""Edge cases of FinePhrase synthesis, the synthetic/original mix and `felix data audit`."""

from __future__ import annotations

import itertools
import json
import random
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("openai")

from provider_servers import ProviderServer, Request  # noqa: E402
from test_synth import documents, rephrase, write_config  # noqa: E402

from felix.cli import main as felix_main  # noqa: E402
from felix.datamix import DataMix  # noqa: E402
from felix.harvest_config import load_harvest_config  # noqa: E402
from felix.synth import (  # noqa: E402
    clip_document,
    doc_id,
    load_documents,
    run_synth,
    sample_rank,
    select_documents,
)
from felix.synth_mix import write_mix  # noqa: E402


def test_clip_document_at_the_limit_and_at_half():
    # the second paragraph ends exactly at the limit: it fits and is kept (was cut back to the first)
    text = "a" * 100 + "\n\n" + "b" * 30 + "\n\n" + "c" * 60
    assert clip_document(text, 132) == "a" * 100 + "\n\n" + "b" * 30
    # a paragraph break at exactly half the limit is used, not a cut in the middle of a word
    assert clip_document("a" * 50 + "\n\n" + "b" * 100, 100) == "a" * 50
    assert clip_document("a" * 50 + "\n" + "b" * 100, 100) == "a" * 50
    assert clip_document("a" * 200, 100) == "a" * 100


def test_clip_document_without_a_line_break_ends_a_sentence_else_a_word():
    words = "Crews fixed the faults at site " * 3  # 93 characters of words and spaces, no sentence end
    # the last sentence end in the second half, its mark and closing quote kept, before a later word end
    assert clip_document("a" * 55 + '." ' + words, 100) == "a" * 55 + '."'
    assert clip_document("a" * 55 + "? " + words, 100) == "a" * 55 + "?"
    # a mark whose space lies just past the limit still ends a sentence that fits
    assert clip_document("a" * 99 + ". " + words, 100) == "a" * 99 + "."
    # no sentence end: the last whole word, with no trailing space
    assert clip_document(words + words, 100) == words + "Crews"  # the next word, "fixed", would end at 104
    assert clip_document("a" * 60 + "  \t b" + "c" * 100, 100) == "a" * 60
    # a line break in the second half still wins over a later sentence end, as before (ids unchanged)
    assert clip_document("a" * 60 + "\n" + "b. " * 30, 100) == "a" * 60
    # boundaries in the first half only: a cut there would drop over half the window
    assert clip_document("a. " + "b" * 200, 100) == "a. " + "b" * 97


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet="ab .?\n\"", max_size=300), st.text(alphabet="ab ", max_size=300)),
       st.integers(10, 200))
def test_clip_document_is_a_prefix_within_the_limit_that_splits_no_word(text, max_chars):
    clipped = clip_document(text, max_chars)
    assert text.startswith(clipped) and len(clipped) <= max_chars
    if len(text) > max_chars:
        assert len(clipped) >= max_chars // 2
        rest = text[len(clipped):]
        if any(not text[i - 1].isspace() and text[i].isspace() for i in range(max_chars // 2, max_chars + 1)):
            # some word ends in the window's second half
            assert rest[0].isspace() and not clipped[-1].isspace() or clipped[-1] == "\n" or rest[0] == "\n"
        # a line break in the second half is where it cuts, as it did before sentences and words were looked at
        line = text[:max_chars + 1].rfind("\n")
        if line >= max_chars // 2 and text[:max_chars + 2].rfind("\n\n") < max_chars // 2:
            assert clipped == text[:line]


WORDS = ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=2)]


def distinct_documents(tmp_path: Path, n: int) -> None:
    """Documents with no words in common, so that no two rephrasings are near-duplicates."""
    names = ["alder", "birch", "cedar", "dogwood", "elm", "fir", "ginkgo", "hazel"]
    docs = [" ".join(f"Site {names[i]} reported {30 + 10 * i + j} faults. Crew {names[i]}{'x' * j} fixed them."
                     for j in range(4)) for i in range(n)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")


def test_mix_takes_only_the_rephrasings_its_config_asks_for(tmp_path):
    distinct_documents(tmp_path, n=4)
    calls = itertools.count()

    def sampling(req: Request) -> str:  # a teacher that words each answer differently
        rng = random.Random(next(calls))
        return rephrase(req) + "\nNote: " + " ".join(rng.choice(WORDS) for _ in range(60)) + "."

    with ProviderServer("openai", responder=sampling) as srv:
        run_synth(load_harvest_config(write_config(tmp_path, srv.url)), progress=False)
        # a second run at another temperature: every document rephrased again, under new keys
        path = write_config(tmp_path, srv.url)
        raw = yaml.safe_load(path.read_text())
        raw["teachers"][0]["temperature"] = 0.7
        path.write_text(yaml.safe_dump(raw))
        cfg = load_harvest_config(path)
        run_synth(cfg, progress=False)
    result = write_mix(cfg, tmp_path / "m.jsonl", synthetic_share=1.0)
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    pairs = [(r["source"], r["doc_id"]) for r in recs]
    assert len(pairs) == len(set(pairs)) == 16 and result["not_in_config"] == 16  # was 32: each twice
    assert {d for _, d in pairs} == {d for d, _ in load_documents(cfg)}
    # formats dropped from the config stay out of the mix (they were all mixed in)
    only_tables = load_harvest_config(write_config(tmp_path, srv.url, formats=["table"]))
    assert write_mix(only_tables, tmp_path / "t.jsonl", synthetic_share=0.5)["by_source"].keys() == {
        "finephrase:table", "original"}


def test_one_long_original_does_not_swamp_the_synthetic_share(tmp_path):
    # a table rephrases four sentences of sixteen: the short documents hold over twice the synthetic text
    docs = [" ".join(f"Site {name} logged {100 + 20 * i + j} readings on day {j + 1}." for j in range(16))
            for i, name in enumerate(["alder", "birch", "cedar", "dogwood", "elm", "fir", "ginkgo", "hazel"])]
    long_doc = "The archive keeps its ledgers on open shelves in the reading room. " * 900  # 60k characters
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in [*docs, long_doc]))
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url, formats=["table"])
        ids = [did for did, _ in select_documents(load_harvest_config(path)).originals]
        long_id = doc_id(clip_document(long_doc.strip(), 6000))
        # a seed whose sample order puts the long document first: it used to be mixed in whole (share 0.5 -> 0.2)
        seed = next(s for s in range(1000) if min(ids, key=lambda d: sample_rank(s, d)) == long_id)
        cfg = load_harvest_config(write_config(tmp_path, srv.url, formats=["table"], seed=seed))
        run_synth(cfg, progress=False)
    result = write_mix(cfg, tmp_path / "m.jsonl", synthetic_share=0.5)
    assert result["rephrasings_left_out"] == 0 and result["by_source"]["original"] >= 2
    assert result["synthetic_share"] == pytest.approx(0.5, abs=0.1)
    # when nothing shorter is left, the shortest document passed over still comes in before any rephrasing goes
    assert write_mix(cfg, tmp_path / "all.jsonl", synthetic_share=0.05)["rephrasings_left_out"] == 0


@pytest.fixture
def synth_store(tmp_path) -> Path:
    documents(tmp_path, n=6)
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url)
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
    return path


def test_mix_line_names_shards_a_data_mix_elsewhere_can_find(synth_store, tiny_mix, monkeypatch, capsys):
    tmp = synth_store.parent
    monkeypatch.chdir(tmp)
    capsys.readouterr()
    assert felix_main(["synth", "mix", "--config", str(synth_store), "--out", "data/fp.jsonl",
                       "--tokenizer", str(tiny_mix.tokenizer_path), "--json"]) == 0
    source = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mix_source"]
    (tmp / "configs").mkdir()
    (tmp / "configs" / "mix.yaml").write_text(yaml.safe_dump({"sources": [source]}))
    # the printed path was "data/fp", which the mix resolved to configs/data/fp: "no shards at"
    assert DataMix.load(tmp / "configs" / "mix.yaml").sources[0].shards == tmp / "data" / "fp"


def test_mix_refuses_a_bad_shard_directory_before_writing_the_mix(synth_store, tiny_mix, capsys):
    tmp = synth_store.parent
    out = tmp / "fp.jsonl"
    out.write_text("the previous mix\n")
    (tmp / "taken").write_text("not shards")
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("keep me")
    (tmp / "kept").mkdir()  # shards, and beside them a file of someone's that replacing them would delete
    (tmp / "kept" / "index.json").write_text("{}")
    (tmp / "kept" / "notes.txt").write_text("keep me")
    for shards, match in (("taken", "is not a directory"), ("busy", "is not a shard directory"),
                          ("kept", "it holds notes.txt")):
        capsys.readouterr()
        assert felix_main(["synth", "mix", "--config", str(synth_store), "--out", str(out), "--shards",
                           str(tmp / shards), "--tokenizer", str(tiny_mix.tokenizer_path)]) == 2
        assert match in capsys.readouterr().err
        assert out.read_text() == "the previous mix\n"  # was overwritten before write_shards refused
    assert (tmp / "kept" / "notes.txt").read_text() == "keep me"


def _checkpoint(run: Path, loader: dict) -> None:
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "trainer.json").write_text(json.dumps({"trainer": {"train_loader": loader}}))


def test_audit_refuses_a_run_drawn_from_other_sources(tiny_mix, tmp_path, capsys):
    run = tmp_path / "run"
    cases = [  # a source the mix lacks counted in the total: code 25%, prose 25%, summing to half
        ({"sample": 20, "counts": {"code": 5, "prose": 5, "web": 10}, "seq_len": 32}, "drew from sources"),
        ({"sample": 5, "counts": {"code": 5}, "seq_len": 32}, "drew from sources"),
        ({"sample": 5, "counts": {"code": "5", "prose": 0}, "seq_len": 32}, "integer per-source 'counts'"),
        ({"sample": 5, "counts": {"code": 5, "prose": 0}, "seq_len": 0}, "'seq_len' >= 1"),
    ]
    for loader, match in cases:
        _checkpoint(run, loader)
        capsys.readouterr()
        assert felix_main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert match in err and "trainer.json" in err
    _checkpoint(run, {"sample": 10, "counts": {"code": 7, "prose": 3}, "seq_len": 32})
    assert felix_main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--run", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sources"]
    assert {r["source"]: r["actual"] for r in rows} == {"code": 0.7, "prose": 0.3}
