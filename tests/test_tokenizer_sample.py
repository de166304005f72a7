"""`felix tokenizer train --sample-bytes`: BPE on about N bytes of text drawn from every source, whole documents,
by a seeded hash of each (deterministic, order-independent), streamed."""

from __future__ import annotations

import argparse
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from felix.cli import main
from felix.commands.arg_types import byte_size
from felix.errors import FelixError
from felix.tokenizer import FelixTokenizer, train_tokenizer
from felix.tokenizer_text import TrainingText, sample_key

WORDS = ["alpha", "beta", "gamma", "delta", "return", "class", "the", "of", "данные", "тест", "日本語", "naïve"]


def _docs(n: int, seed: int, tag: str) -> list[str]:
    r = random.Random(seed)
    return [f"{tag} {i}: " + " ".join(r.choice(WORDS) for _ in range(r.randint(10, 120))) for i in range(n)]


def _jsonl(path: Path, docs: list[str], ensure_ascii: bool = True) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=ensure_ascii) + "\n" for d in docs), "utf-8")
    return path


def _txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n<|endoftext|>\n".join(docs), encoding="utf-8")
    return path


@pytest.fixture
def sources(tmp_path) -> dict[str, tuple[Path, list[str]]]:
    """Three sources of different sizes and formats: JSON with \\u escapes (~2x its text on disk), plain .txt,
    and chats."""
    a, b = _docs(1500, 1, "a"), _docs(400, 2, "b")
    chats = [[{"role": "user", "content": f"question {i} " + d}, {"role": "assistant", "content": f"answer {i}"}]
             for i, d in enumerate(_docs(200, 3, "c"))]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats), "utf-8")
    return {"a": (_jsonl(tmp_path / "a.jsonl", a), a), "b": (_txt(tmp_path / "b.txt", b), b),
            "c": (tmp_path / "c.jsonl", [t for m in chats for t in (m[0]["content"], m[1]["content"])])}


def _paths(sources) -> list[Path]:
    return [p for p, _ in sources.values()]


def test_the_sample_is_deterministic_seeded_and_independent_of_order(sources, tmp_path):
    files = _paths(sources)
    first = list(TrainingText(files, 100_000, seed=0))
    assert first == list(TrainingText(files, 100_000, seed=0))
    other = list(TrainingText(files, 100_000, seed=1))
    assert other != first and set(other) != set(first)
    # the same documents whatever order the files, or the lines within a file, come in
    a_path, a_docs = sources["a"]
    shuffled = _jsonl(tmp_path / "a-shuffled.jsonl", random.Random(5).sample(a_docs, len(a_docs)))
    again = list(TrainingText([shuffled, *files[:0:-1]], 100_000, seed=0))
    assert sorted(again) == sorted(first)


def test_the_sample_is_about_n_bytes_of_text_in_proportion_to_each_source(sources):
    files = _paths(sources)
    everything = TrainingText(files)
    total = sum(len(t.encode()) for t in everything)
    assert everything.report["bytes"] == total and everything.keep == 1.0
    n = total // 4
    text = TrainingText(files, n, seed=3)
    taken = list(text)
    got = sum(len(t.encode()) for t in taken)
    assert text.report["bytes"] == got
    # N counts text: a.jsonl's \u escapes make the file ~2x its text, which an estimate from file sizes
    # alone would have taken for text, drawing far too little
    assert 0.85 * n <= got <= 1.15 * n, (got, n)
    for use in text.sources:  # each source in proportion to its size
        assert 0.6 * text.keep <= use.bytes / use.bytes_read <= 1.4 * text.keep, use
        assert use.documents < use.documents_read
    assert [u.documents_read for u in text.sources] == [1500, 400, 200]


def test_every_source_gives_whole_documents_and_a_tiny_one_still_gives_one(sources, tmp_path):
    tiny_docs = ["a tiny source, one short document", "and another", "and a third"]
    tiny = _jsonl(tmp_path / "tiny.jsonl", tiny_docs)
    files = [*_paths(sources), tiny]
    text = TrainingText(files, 20_000, seed=0)
    taken = list(text)
    assert all(use.documents >= 1 for use in text.sources), text.sources
    assert text.sources[-1].documents == 1  # its lowest-keyed document: ~0.01 expected of it otherwise
    assert min(tiny_docs, key=lambda d: sample_key(d.encode(), 0)) in taken
    whole = {d for _, docs in sources.values() for d in docs} | set(tiny_docs)
    assert set(taken) <= whole  # every text one whole document (a chat's turn), none cut


def test_the_sample_is_streamed_not_held(tmp_path):
    docs = _docs(20_000, 7, "s")  # ~8 MB on disk
    src = _jsonl(tmp_path / "big.jsonl", docs)
    text = TrainingText([src], 2_000_000, seed=0)
    it = iter(text)
    next(it)
    assert text.sources[0].documents_read < 100  # read as training asks, not read ahead
    tracemalloc.start()
    try:
        kept = sum(1 for _ in it)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # about as many documents as 2 MB holds at their mean size (4,433 here; a binomial draw, sd ~60)
    expected = 2_000_000 / (sum(len(d.encode()) for d in docs) / len(docs))
    assert abs(kept - expected) < 0.1 * expected, (kept, expected)
    assert peak < 1_000_000, peak  # a few documents' worth, not the file nor the sample


def test_a_sampled_tokenizer_trains_and_the_default_reads_all_the_text(sources, tmp_path):
    files = _paths(sources)
    whole = train_tokenizer(files, 400, tmp_path / "whole.json")
    # a sample bigger than the input is the input: the same tokenizer, byte for byte
    same = train_tokenizer(TrainingText(files, 10**12), 400, tmp_path / "same.json")
    assert (tmp_path / "same.json").read_bytes() == (tmp_path / "whole.json").read_bytes()
    sampled = train_tokenizer(TrainingText(files, 30_000), 400, tmp_path / "sampled.json")
    assert isinstance(sampled, FelixTokenizer) and sampled.vocab_digest != whole.vocab_digest == same.vocab_digest


def test_byte_sizes_parse_and_bad_ones_are_clear_errors(sources):
    assert byte_size("123") == 123 and byte_size("500M") == 500_000_000 and byte_size("2G") == 2_000_000_000
    assert byte_size("1.5GB") == 1_500_000_000 and byte_size("2GiB") == 2 * 2**30 and byte_size("64k") == 64_000
    for bad in ("0", "-5", "abc", "2X", "1.2.3", "", "0.0001k", "5i"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FelixError, match="sample_bytes must be a positive number of bytes"):
            TrainingText(_paths(sources), bad)


def test_cli_sample_bytes_reports_each_source(sources, tmp_path, capsys):
    files = [str(p) for p in _paths(sources)]
    base = ["tokenizer", "train", "--input", *files, "--vocab-size", "300", "--out", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--sample-bytes", "lots"])
    assert exc.value.code == 2 and "--sample-bytes: not a number of bytes: 'lots'" in capsys.readouterr().err
    assert main([*base, "--sample-bytes", "50k", "--seed", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sample_bytes"] == 50_000 and out["seed"] == 2 and 0 < out["keep_probability"] < 1
    assert [s["path"] for s in out["sources"]] == files
    assert all(0 < s["documents"] < s["documents_read"] and 0 < s["bytes"] < s["bytes_read"] for s in out["sources"])
    assert out["bytes"] == sum(s["bytes"] for s in out["sources"]) and 0.8 * 50_000 < out["bytes"] < 1.2 * 50_000
    assert main([*base, "--sample-bytes", "50k", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert f"documents, {out['bytes'] / 1e3:.2f}kB of text, of 50.00kB asked" in text  # the same draw
    for s in out["sources"]:
        assert f"{s['path']}: " in text
