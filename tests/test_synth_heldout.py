"""FinePhrase and held-out text: val documents of the data mix stay out of the synth mix; the sample survives
additions; whole originals; accounting of interrupted runs, unanswered requests and thinned rephrasings; the
synth mix's own split keeps a rephrasing with its original."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("openai")

from provider_servers import ProviderServer, Request  # noqa: E402
from test_synth import documents, rephrase, write_config  # noqa: E402

from felix.cli import main as felix_main  # noqa: E402
from felix.corpus import iter_documents  # noqa: E402
from felix.datamix import DataMix, MixSource  # noqa: E402
from felix.errors import FelixError  # noqa: E402
from felix.harvest_config import load_harvest_config  # noqa: E402
from felix.harvest_store import HarvestStore  # noqa: E402
from felix.shards import ShardSet, write_shards  # noqa: E402
from felix.synth import clip_document, doc_id, heldout_report, load_documents, select_documents  # noqa: E402
from felix.synth_heldout import split_documents, text_key, word_ngrams  # noqa: E402
from felix.synth_mix import write_mix  # noqa: E402
from felix.tokenizer import FelixTokenizer, train_tokenizer  # noqa: E402


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def prose(rng: random.Random, sentences: int) -> str:
    """Made-up sentences of 12 words and a number each: no two calls share a run of 13 words (test_synth's
    documents are one template, near copies of each other)."""
    out = []
    for _ in range(sentences):
        words = ["".join(rng.choice("aeioubdfgklmnprstvz") for _ in range(rng.randint(3, 9))) for _ in range(12)]
        out.append(f"{words[0].capitalize()} {' '.join(words[1:])} {rng.randint(21, 999)}.")
    return " ".join(out)


def distinct_documents(tmp_path: Path, n: int) -> Path:
    """docs.jsonl of `n` unrelated documents (and one too short to use)."""
    rng = random.Random(n)
    docs = [prose(rng, 4) for _ in range(n)] + ["too short"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return src


@pytest.fixture
def sharded_docs(tmp_path) -> tuple[Path, FelixTokenizer, list[str]]:
    """docs.jsonl, also sharded as the data mix's `docs` source (the README's recipe); its val documents."""
    src = distinct_documents(tmp_path, n=12)
    tok = train_tokenizer([src], 300, tmp_path / "tokenizer.json")
    shards = write_shards(iter_documents(src), tok, tmp_path / "shards" / "docs", val_fraction=0.3, seed=5,
                          min_val_tokens=200)
    DataMix(sources=[MixSource(name="docs", shards=Path("shards/docs"), weight=1.0)]).write(tmp_path / "mix.yaml")
    val = [v for v in split_documents(shards, "val", tok) if len(v) >= 50]  # "too short" is no synth document
    assert 1 <= len(val) < 12
    return src, tok, val


def test_val_documents_of_the_data_mix_are_neither_rephrased_nor_mixed(tmp_path, sharded_docs, capsys):
    """docs.jsonl is a synth source and a mix source: its val documents used to be copied into the synth mix's
    train split, with their rephrasings (3 of 3 in the reviewer's run)."""
    _, tok, val = sharded_docs
    heldout = {"tokenizer": "tokenizer.json", "mixes": ["mix.yaml"]}
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url, formats=["faq", "table"], heldout=heldout)
        assert felix_main(["synth", "--config", str(path), "--no-progress", "--json"]) == 0
        asked = [r.user for r in srv.requests]
    run = last_json(capsys.readouterr().out)
    assert run["documents"] == 12 - len(val) and run["heldout"]["documents_held_out"] == len(val)
    assert not any(v.strip() in user for v in val for user in asked)  # no money spent on them
    out = tmp_path / "fp.jsonl"
    assert felix_main(["synth", "mix", "--config", str(path), "--out", str(out), "--tokenizer",
                       str(tok.path), "--share", "0.5", "--json"]) == 0
    report = last_json(capsys.readouterr().out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    held_ids = {doc_id(clip_document(v.strip(), 6000)) for v in val}
    assert not {text_key(r["text"]) for r in recs} & {text_key(v) for v in val}
    assert not {r["doc_id"] for r in recs} & held_ids and report["heldout"]["documents_held_out"] == len(val)
    # the synth mix joins the data mix: its own val split is not held out of the next run (it would drop
    # those originals from every later mix), so the selection stays as it was
    before = load_documents(load_harvest_config(path))
    mix = yaml.safe_load((tmp_path / "mix.yaml").read_text())
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"sources": [*mix["sources"], report["mix_source"]]}))
    again = select_documents(load_harvest_config(path))
    assert again.documents == before and again.held_out == len(val)
    assert again.heldout.skipped == [report["shards"]]


def test_heldout_needs_the_tokenizer_the_shards_were_made_with(tmp_path, sharded_docs, tiny_mix):
    path = write_config(tmp_path, "http://127.0.0.1:9",
                        heldout={"tokenizer": str(tiny_mix.tokenizer_path), "shards": ["shards/docs"]})
    with pytest.raises(FelixError, match="another tokenizer"):
        select_documents(load_harvest_config(path))
    path = write_config(tmp_path, "http://127.0.0.1:9", heldout={"tokenizer": "tokenizer.json"})
    with pytest.raises(FelixError, match="heldout names no val split"):
        load_harvest_config(path)


def _held_out_of(tmp_path: Path, val: list[str], sources: list[str], **heldout) -> dict:
    """synth.heldout's report when `val` is a shard directory's val split and `sources` the synth sources."""
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in val), encoding="utf-8")
    tok = train_tokenizer([tmp_path / "val.jsonl"], 300, tmp_path / "tokenizer.json")
    shards = write_shards(val, tok, tmp_path / "val", val_fraction=0.999, seed=1)
    assert sorted(split_documents(shards, "val", tok)) == sorted(val)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in sources), encoding="utf-8")
    path = write_config(tmp_path, "http://127.0.0.1:9",
                        heldout={"tokenizer": "tokenizer.json", "shards": ["val"], **heldout})
    corpus = select_documents(load_harvest_config(path))
    return heldout_report(corpus) | {"kept": sorted(text for _, text in corpus.originals)}


def test_near_copies_of_val_documents_are_held_out(tmp_path):
    """Before: only whitespace-exact copies were; a val document with a word changed, cut short or inside a
    longer document was rephrased and trained on."""
    rng = random.Random(7)
    val = [prose(rng, 10) for _ in range(3)]  # 121 words each
    val.append("Tiny validation note about runner queues and build farm capacity 42.")  # 11 words
    words = val[1].split()
    edited = " ".join("CHANGED" if i % 40 == 20 else w for i, w in enumerate(words))  # 3 of 121 words
    boilerplate = prose(rng, 4) + " " + " ".join(val[0].split()[24:40]) + " " + prose(rng, 4)  # 16 words
    unrelated = [prose(rng, 6) for _ in range(3)]
    sources = [
        "  " + val[0].upper().replace(" ", "\n "),  # case, spacing: a near copy (exact needs the same case)
        edited,
        prose(rng, 15) + "\n\n" + val[2] + "\n\n" + prose(rng, 15),  # the val document inside a longer one
        " ".join(val[2].split()[:70]),  # cut short
        val[3].replace(" ", "   "),  # shorter than an n-gram: an exact copy still counts
        val[3].replace("42", "43"),  # ... a near one does not
        boilerplate,  # one long shared sentence is no copy
        *unrelated,
    ]
    report = _held_out_of(tmp_path, val, sources)
    assert report["documents_held_out"] == 5 and report["near_copies"] == 4
    assert report["kept"] == sorted([val[3].replace("42", "43"), boilerplate, *unrelated])
    # n-grams longer than any document: exact copies only
    (tmp_path / "long").mkdir()
    long = _held_out_of(tmp_path / "long", val, sources, ngram=200)
    assert long["documents_held_out"] == 1 and long["near_copies"] == 0 and len(long["kept"]) == len(sources) - 1


def test_word_ngrams_ignore_case_spacing_and_punctuation():
    assert np.array_equal(word_ngrams("The cache, moved.  Back!", 2), word_ngrams("the CACHE moved back", 2))
    assert len(word_ngrams("a b c a b c", 2)) == 3 and len(word_ngrams("a b", 3)) == 0


@pytest.mark.parametrize(("key", "value", "why"), [("ngram", 0, "greater than or equal to 1"),
                                                   ("containment", 0, "greater than 0"),
                                                   ("containment", 1.5, "less than or equal to 1")])
def test_heldout_near_copy_settings_are_checked(tmp_path, key, value, why):
    heldout = {"tokenizer": "t.json", "shards": ["s"]}
    assert load_harvest_config(write_config(tmp_path, "http://127.0.0.1:9", heldout=heldout)).synth.heldout.ngram == 13
    path = write_config(tmp_path, "http://127.0.0.1:9", heldout=heldout | {key: value})
    with pytest.raises(FelixError, match=rf"synth\.heldout\.{key}: Input should be {why}"):
        load_harvest_config(path)


def test_the_sample_survives_added_documents(tmp_path):
    """Adding two documents to 40 used to reshuffle the whole max_documents sample: most were asked (paid)
    again. Now only the new documents that rank into the sample are asked, displacing as many."""
    documents(tmp_path, n=40)
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url, formats=["faq"], max_documents=10)
        first = {d for d, _ in load_documents(load_harvest_config(path))}
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
        n = len(srv.requests)
        documents(tmp_path, n=42)  # the same 40, and two more
        second = {d for d, _ in load_documents(load_harvest_config(path))}
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
        asked_again = len(srv.requests) - n
    new = second - first
    assert len(first) == len(second) == 10 and len(new) <= 2
    assert len(first & second) == 10 - len(new) and asked_again == len(new)


def test_originals_are_whole_documents_and_thinning_is_reported(tmp_path, capsys):
    """The original side was the rephrased documents clipped to max_chars; the synthetic side was then
    thinned to reach the share, and the thinned count reported nowhere."""
    documents(tmp_path, n=8)
    src = tmp_path / "docs.jsonl"
    long = [d + "\n\n" + " ".join(f"Runner {i} logged {i * 7} jobs." for i in range(30))
            for d in iter_documents(src)][:8]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in long), encoding="utf-8")
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url, formats=["faq", "tutorial"], max_chars=300, max_documents=2)
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
    cfg = load_harvest_config(path)
    result = write_mix(cfg, tmp_path / "m.jsonl", synthetic_share=0.5)
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    originals = [r["text"] for r in recs if r["source"] == "original"]
    assert originals and all(o in {d.strip() for d in long} for o in originals)  # whole, not cut at 300
    # enough whole text in the sources (beyond the two rephrased): nothing thinned
    assert result["rephrasings_left_out"] == 0 and sum(r["source"] != "original" for r in recs) == 4
    capsys.readouterr()
    assert felix_main(["synth", "mix", "--config", str(path), "--out", str(tmp_path / "t.jsonl"),
                       "--share", "0.02"]) == 0
    out = capsys.readouterr().out
    thin = write_mix(cfg, tmp_path / "t.jsonl", synthetic_share=0.02)
    kept = sum(v for k, v in thin["by_source"].items() if k != "original")
    assert thin["rephrasings_left_out"] == 4 - kept > 0
    assert f"left out {thin['rephrasings_left_out']} rephrasings to keep the synthetic share" in out


def test_interrupted_synth_json_prints_what_it_did(tmp_path, capsys):
    """SIGTERM mid-run: exit 143 with the partial object on stdout (it printed nothing)."""
    documents(tmp_path, n=3)
    sent = []

    def stop_on_first(req: Request) -> str:
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # felix's handler turns it into RunStopped in the main thread
            time.sleep(0.3)  # the answer is in flight when the run stops: it is stored
        return rephrase(req)

    with ProviderServer("openai", responder=stop_on_first) as srv:
        path = write_config(tmp_path, srv.url, formats=["faq"])
        raw = yaml.safe_load(path.read_text())
        raw["teachers"][0]["concurrency"] = 1
        path.write_text(yaml.safe_dump(raw))
        capsys.readouterr()
        assert felix_main(["synth", "--config", str(path), "--no-progress", "--json"]) == 143
    result = last_json(capsys.readouterr().out)
    with HarvestStore(tmp_path / "store.sqlite") as store:
        kept = sum(1 for _ in store.rows("synth", "ok"))
    assert result["interrupted"] == "SIGTERM" and result["requests"] == 3 and result["run"]["owed"] == 3
    assert result["run"]["ok"] == kept >= 1 and result["totals"]["openai:smol"]["ok"] == kept


def test_mix_says_how_many_requests_are_unanswered(tmp_path, capsys):
    documents(tmp_path, n=3)
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url, formats=["faq", "table"])
        assert felix_main(["synth", "--config", str(path), "--no-progress", "--set", "synth.max_documents=1"]) == 0
    capsys.readouterr()
    assert felix_main(["synth", "mix", "--config", str(path), "--out", str(tmp_path / "m.jsonl")]) == 0
    assert "4 of this config's 6 requests have no answer yet" in capsys.readouterr().out
    assert write_mix(load_harvest_config(path), tmp_path / "m.jsonl")["unanswered"] == 4


@pytest.mark.parametrize(("formats", "match"), [([], "formats is empty"), (["faq", "faq"], "more than once")])
def test_formats_empty_or_repeated_are_refused(tmp_path, formats, match):
    with pytest.raises(FelixError, match=match):
        load_harvest_config(write_config(tmp_path, "http://127.0.0.1:9", formats=formats))


def test_nothing_kept_for_fidelity_says_why_in_a_sentence(tmp_path, capsys):
    documents(tmp_path, n=1)
    with ProviderServer("openai", responder=lambda r: rephrase(r) + "\nQ: When?\nA: In 1987.") as srv:
        path = write_config(tmp_path, srv.url, formats=["faq"])
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert felix_main(["synth", "mix", "--config", str(path), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert ("1 kept out by the fidelity check; every answer failed the fidelity check (it states numbers its "
            "document does not, or a math problem uses none of the document's); try other teachers or formats"
            ) in capsys.readouterr().err


def test_mix_shards_keep_a_rephrasing_with_its_original_and_size_val(tmp_path, capsys):
    src = documents(tmp_path, n=12)
    tok = train_tokenizer([src], 300, tmp_path / "tokenizer.json")
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url, formats=["faq", "tutorial"])
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
    out = tmp_path / "fp.jsonl"
    sides = {}
    for min_val in (0, 400):
        capsys.readouterr()
        assert felix_main(["synth", "mix", "--config", str(path), "--out", str(out), "--tokenizer",
                           str(tok.path), "--min-val-tokens", str(min_val), "--json"]) == 0
        report = last_json(capsys.readouterr().out)
        shards = ShardSet.open(report["shards"])
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        by_text = {r["text"]: r["doc_id"] for r in recs}
        sides[min_val] = {s: {by_text[t] for t in split_documents(shards, s, tok)} for s in ("train", "val")}
        assert sides[min_val]["val"] and not sides[min_val]["val"] & sides[min_val]["train"]
        assert report["val_tokens"] == shards.n_tokens("val")
    assert report["val_tokens"] >= 400
    assert len(sides[400]["val"]) > len(sides[0]["val"])
