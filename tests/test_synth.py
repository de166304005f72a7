"""FinePhrase synthesis through a local OpenAI-compatible server, dedupe, and the synthetic/original mix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("openai")

from provider_servers import ProviderServer, Request  # noqa: E402

from felix.cli import main as felix_main  # noqa: E402
from felix.datamix import DataMix  # noqa: E402
from felix.errors import FelixError  # noqa: E402
from felix.harvest_config import load_harvest_config  # noqa: E402
from felix.shards import ShardSet  # noqa: E402
from felix.synth import (  # noqa: E402
    FORMATS,
    clip_document,
    invented_numbers,
    load_documents,
    prompt,
    run_synth,
    shape_problem,
)
from felix.synth_mix import near_duplicates, write_mix  # noqa: E402

DOC = ("The build farm has 12 runners. In March the queue time rose from 4 minutes to 19 minutes after the "
       "cache moved to a slower disk. Priya Raman moved the cache back on 14 March and queue time fell to 5 minutes.")


def rephrase(req: Request) -> str:
    """A well-behaved rephraser: the shape each format promises, built from the document's sentences."""
    doc = req.user.split("<<<\n", 1)[1].rsplit("\n>>>", 1)[0]
    sents = [s.strip() for s in re.split(r"(?<=\.)\s+", doc) if s.strip()][:4]
    nums = re.findall(r"\d+", doc) or ["3", "4"]
    if "Markdown table" in req.user:
        rows = "\n".join(f"| {i + 1} | {s} |" for i, s in enumerate(sents))
        return f"| # | Fact |\n|---|---|\n{rows}\n\nQuestion: What is fact 1?\nAnswer: {sents[0]}"
    if "word problem" in req.user:
        return (f"If a team has {nums[0]} items and gets {nums[-1]} more, how many in all?\n"
                f"Step 1: {nums[0]} + {nums[-1]}.\nAnswer: {int(nums[0]) + int(nums[-1])}")
    if "questions a reader" in req.user:
        return "\n".join(f"Q: What does the text say ({i + 1})?\nA: {s}" for i, s in enumerate(sents))
    return "You will learn the key points.\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(sents))


def documents(tmp_path: Path, n: int = 6) -> Path:
    src = tmp_path / "docs.jsonl"
    docs = [DOC.replace("12 runners", f"{12 + i} runners").replace("Priya", ["Priya", "Tomas", "Aiko"][i % 3])
            + f" Incident {100 + i} closed." for i in range(n)]
    docs.append("too short")
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return src


def write_config(tmp_path: Path, url: str, **synth) -> Path:
    cfg = {"store": "store.sqlite",
           "teachers": [{"name": "phraser", "provider": "openai", "model": "smol", "base_url": url + "/v1",
                         "timeout": 2}],
           "retry": {"max_retries": 2, "max_attempts": 2, "backoff_base": 0.0},
           "synth": {"sources": ["docs.jsonl"], "min_chars": 50, **synth}}
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_prompts_are_ours_and_shapes_are_checked():
    for fmt in FORMATS:
        system, user = prompt(fmt, DOC)
        assert DOC in user and "Work only from the document" in system
        assert shape_problem(fmt, rephrase(Request("", {}, {}, system, user, "m", None, None)), DOC) is None
        assert shape_problem(fmt, "Sure! Here is the text you asked for, rewritten.", DOC) is not None
    assert shape_problem("faq", DOC, DOC) is not None
    assert "copies the document" in shape_problem("tutorial", "1. " + DOC + "\n2. " + DOC, DOC)
    with pytest.raises(FelixError, match="unknown FinePhrase format"):
        prompt("haiku", DOC)


def test_clip_document_cuts_at_a_paragraph():
    text = "a" * 60 + "\n\n" + "b" * 60 + "\n\n" + "c" * 60
    assert clip_document(text, 140) == "a" * 60 + "\n\n" + "b" * 60
    assert clip_document(text, 1000) == text


def test_synth_run_is_idempotent_and_rejects_malformed(tmp_path):
    documents(tmp_path)

    def lazy_tables(req: Request) -> str:
        return "A table would go here." if "Markdown table" in req.user else rephrase(req)

    with ProviderServer("openai", responder=lazy_tables) as srv:
        cfg = load_harvest_config(write_config(tmp_path, srv.url))
        first = run_synth(cfg, progress=False)
        asked = len(srv.requests)
        again = run_synth(cfg, progress=False)
    assert first["documents"] == 6 and first["requests"] == 24
    assert first["run"]["ok"] == 18 and first["totals"]["openai:smol"]["gave_up"] == 6
    assert asked == 18 + 6 * 2  # each bad table asked max_attempts times
    assert again["run"]["owed"] == 0 and len(srv.requests) == asked


def test_near_duplicates_found_and_distinct_texts_kept():
    base = " ".join(f"word{i}" for i in range(200))
    near = base.replace("word50", "other50")
    distinct = " ".join(f"term{i}" for i in range(200))
    assert near_duplicates([base, near, distinct]) == {1}
    assert near_duplicates([base, distinct], threshold=0.99) == set()


def test_mix_blends_at_the_share_and_shards_for_the_data_mix(tmp_path, tiny_mix, capsys):
    documents(tmp_path, n=12)
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url)
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
    cfg = load_harvest_config(path)
    out = tmp_path / "mix" / "finephrase.jsonl"
    result = write_mix(cfg, out, synthetic_share=0.5)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["source"] for r in recs} == {"original", *(f"finephrase:{f}" for f in FORMATS)}
    synth_chars = sum(len(r["text"]) for r in recs if r["source"] != "original")
    assert synth_chars / sum(len(r["text"]) for r in recs) == pytest.approx(result["synthetic_share"], abs=1e-3)
    assert 0.35 <= result["synthetic_share"] <= 0.65
    assert {r["doc_id"] for r in recs if r["source"] == "original"} <= {d for d, _ in load_documents(cfg)}
    capsys.readouterr()
    assert felix_main(["synth", "mix", "--config", str(path), "--out", str(out), "--share", "0.7",
                       "--tokenizer", str(tiny_mix.tokenizer_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["synthetic_share"] > result["synthetic_share"]
    shards = ShardSet.open(report["shards"])
    assert shards.n_tokens("train") == report["tokens"] > 0
    mix_file = tmp_path / "mix.yaml"
    mix_file.write_text(yaml.safe_dump({"sources": [report["mix_source"]]}))
    assert DataMix.load(mix_file).sources[0].name == "finephrase"


def test_mix_without_store_is_a_clear_error(tmp_path):
    documents(tmp_path)
    cfg = load_harvest_config(write_config(tmp_path, "http://127.0.0.1:9"))
    with pytest.raises(FelixError, match="no store yet"):
        write_mix(cfg, tmp_path / "m.jsonl")


def test_invented_numbers_are_kept_out_of_the_mix(tmp_path):
    documents(tmp_path, n=4)

    def embellish(req: Request) -> str:
        text = rephrase(req)
        return text + "\nQ: When?\nA: In 1987." if "questions a reader" in req.user else text

    with ProviderServer("openai", responder=embellish) as srv:
        cfg = load_harvest_config(write_config(tmp_path, srv.url))
        result = run_synth(cfg, progress=False)
    t = result["totals"]["openai:smol"]
    assert t["ok"] == 16 and t["gate_passed"] == 12  # the four faqs are kept, marked, and not asked again
    recs = [json.loads(line) for line in
            Path(write_mix(cfg, tmp_path / "m.jsonl", synthetic_share=0.5)["out"]).read_text().splitlines()]
    assert "finephrase:faq" not in {r["source"] for r in recs} and not any("1987" in r["text"] for r in recs)
    assert invented_numbers("faq", "A: 12 runners, 1987 and 5", DOC) == ["1987"]
    assert invented_numbers("math", "7 + 8 = 15\nAnswer: 15", DOC) == ["none of the document's numbers"]
    assert invented_numbers("math", "12 + 4 = 16\nAnswer: 16", DOC) == []


def test_mix_refuses_bad_outputs_before_writing_anything(tmp_path, capsys):
    from felix.tokenizer import train_tokenizer

    src = documents(tmp_path)
    with ProviderServer("openai", responder=rephrase) as srv:
        path = write_config(tmp_path, srv.url)
        assert felix_main(["synth", "--config", str(path), "--no-progress"]) == 0
    (tmp_path / "tok").mkdir()
    tok = train_tokenizer([src], 300, tmp_path / "tok" / "tokenizer.json").path
    before = sorted(p.name for p in tmp_path.iterdir())
    source = src.read_bytes()
    (tmp_path / "adir").mkdir()
    cases = [
        (["--out", str(src)], "is the store or a synth source"),  # used to overwrite the source documents
        (["--out", str(tmp_path / "store.sqlite")], "is the store or a synth source"),
        (["--out", str(tmp_path / "adir")], "is a directory"),  # was an IsADirectoryError traceback
        (["--out", str(tmp_path / "m.jsonl"), "--tokenizer", str(tmp_path / "nope.json")], "tokenizer not found"),
        (["--out", str(tmp_path / "mixfile"), "--tokenizer", str(tok)], "is the mix file --out itself"),
        (["--out", str(tmp_path / "m.jsonl"), "--set", "synth.min_chars=100000"], "no document of at least"),
    ]
    for flags, match in cases:
        capsys.readouterr()
        assert felix_main(["synth", "mix", "--config", str(path), *flags]) == 2
        assert match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "adir") == before and src.read_bytes() == source
    assert not any((tmp_path / "adir").iterdir())
    # a run with nothing to rephrase is an error too, not "0 documents x 4 formats: asked 0"
    assert felix_main(["synth", "--config", str(path), "--set", "synth.min_chars=100000", "--no-progress"]) == 2


def test_mix_with_nothing_kept_counts_what_came_of_the_requests(tmp_path, capsys):
    """A run whose every answer was malformed: the mix says so, instead of asking for the run just made."""
    documents(tmp_path, n=1)
    with ProviderServer("openai", responder=lambda req: "Sure! Here is the text you asked for.") as srv:
        config = write_config(tmp_path, srv.url, formats=["table"])
        assert felix_main(["synth", "--config", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    assert felix_main(["synth", "mix", "--config", str(config), "--out", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "0 of this config's 1 rephrasings kept: 1 malformed; `felix synth` asks" in err
    assert "with this config first" not in err and not (tmp_path / "m.jsonl").exists()


def test_sources_may_be_glob_patterns(tmp_path):
    """Before, `docs/*.txt` was taken for a file name: "synth source not found: .../docs/*.txt"."""
    src = documents(tmp_path)
    texts = [json.loads(line)["text"] for line in src.read_text(encoding="utf-8").splitlines()]
    (tmp_path / "docs" / "more").mkdir(parents=True)
    for i, text in enumerate(texts):
        (tmp_path / "docs" / ("more" if i % 2 else "") / f"d{i}.txt").write_text(text, encoding="utf-8")
    listed = load_documents(load_harvest_config(write_config(tmp_path, "http://127.0.0.1:9")))
    for sources in (["docs/*.txt", "docs/more/*.txt"], ["docs/**/*.txt"], ["docs/**/*.txt", "docs/d0.txt"]):
        cfg = load_harvest_config(write_config(tmp_path, "http://127.0.0.1:9", sources=sources))
        assert load_documents(cfg) == listed  # the same documents, each once
    cfg = load_harvest_config(write_config(tmp_path, "http://127.0.0.1:9", sources=["docs/*.jsonl"]))
    with pytest.raises(FelixError, match=r"synth source 'docs/\*\.jsonl' matches no file \(pattern .*docs/\*\.jsonl\)"):
        load_documents(cfg)
