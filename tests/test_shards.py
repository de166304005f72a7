"""Shards and the data mix: layout, checksums, clear errors, nothing half-written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from felix.corpus import iter_documents
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.shards import SYNTH_MIX_MARKER, ShardSet, _document_key, write_shards
from felix.synth_heldout import split_documents

DOCS = [f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(200)]


def test_shards_hold_every_document_once_with_boundaries(tiny_mix, tmp_path):
    tok = tiny_mix.tokenizer
    shards = write_shards(DOCS, tok, tmp_path / "s", val_fraction=0.1, shard_tokens=500)
    meta = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(meta["splits"]["train"]["files"]) > 1 and shards.n_documents("val") > 0
    assert shards.n_documents("train") + shards.n_documents("val") == len(DOCS)
    assert shards.n_bytes("train") + shards.n_bytes("val") == sum(len(d.encode()) for d in DOCS)
    decoded = []
    for split in ("train", "val"):
        ids = np.concatenate(shards.arrays(split)).tolist()
        assert ids[-1] == tok.eot_id
        decoded += tok.decode(ids).split("<|endoftext|>")[:-1]
    assert sorted(decoded) == sorted(DOCS)
    assert shards.arrays("train")[0].dtype == np.uint16 and isinstance(shards.arrays("train")[0], np.memmap)


def test_truncated_and_corrupted_shards_are_named(tiny_mix, tmp_path):
    write_shards(DOCS, tiny_mix.tokenizer, tmp_path / "s", val_fraction=0.1)
    f = tmp_path / "s" / "train-00000.bin"
    data = bytearray(f.read_bytes())
    f.write_bytes(data[:-2])
    with pytest.raises(FelixError, match="train-00000.bin: truncated"):
        ShardSet.open(tmp_path / "s")
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FelixError, match="train-00000.bin: corrupted"):
        ShardSet.open(tmp_path / "s")
    ShardSet.open(tmp_path / "s", verify=False)  # size is right; only the checksum catches it


def test_failure_mid_write_leaves_nothing(tiny_mix, tmp_path):
    def docs():
        yield from DOCS[:50]
        raise FelixError("source broke")

    with pytest.raises(FelixError, match="source broke"):
        write_shards(docs(), tiny_mix.tokenizer, tmp_path / "s", batch_docs=8)
    assert list(tmp_path.iterdir()) == []


def test_bad_source_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    (tmp_path / "junk.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, msg in [("empty.jsonl", "empty"), ("bad.jsonl", "line 2: expected an object"),
                      ("junk.jsonl", "line 2: invalid JSON"), ("latin1.txt", "not valid UTF-8")]:
        with pytest.raises(FelixError, match=f"{name}.*{msg}"):
            list(iter_documents(tmp_path / name))


def test_mix_errors_name_the_file_and_source(tiny_mix, tmp_path):
    good = tiny_mix.root / "shards" / "code"
    mix = tmp_path / "mix.yaml"
    DataMix(sources=[MixSource(name="code", shards=good, weight=1),
                     MixSource(name="web", shards=Path("nowhere"), weight=1)]).write(mix)
    with pytest.raises(FelixError, match=r"mix.yaml: source 'web': no shards"):
        DataMix.load(mix)
    mix.write_text(f"sources:\n  - {{name: code, shards: {good}, weight: -1, colour: red}}\n")
    with pytest.raises(FelixError, match=r"(?s)data mix: sources.0.weight: .*data mix: sources.0.colour: unknown key"):
        DataMix.load(mix)
    entry = f"  - {{name: a, shards: {good}, weight: 1}}\n"
    mix.write_text("sources:\n" + entry + entry)
    with pytest.raises(FelixError, match="duplicate source names"):
        DataMix.load(mix)


def test_mix_rejects_shards_from_another_tokenizer(tiny_mix, tmp_path):
    from felix.tokenizer import train_tokenizer

    src = tmp_path / "other.txt"
    src.write_text("completely different text " * 200)
    other = train_tokenizer([src], 300, tmp_path / "other.json")
    with pytest.raises(FelixError, match="different tokenizer"):
        DataMix.load(tiny_mix.mix_path).validate_against(other)
    DataMix.load(tiny_mix.mix_path).validate_against(tiny_mix.tokenizer)


def key(doc: str, seed: int = 0) -> float:
    return _document_key(doc.encode(), seed)


def test_val_always_gets_a_document_and_tokens_are_memmaps(tiny_mix, tmp_path):
    tok = tiny_mix.tokenizer
    # val_fraction 0 and a flush after every document: the held-back document of lowest hash still becomes val
    shards = write_shards(DOCS[:5], tok, tmp_path / "s", val_fraction=0.0, shard_tokens=1)
    assert shards.n_documents("val") == 1 and shards.n_documents("train") == 4
    first = min(DOCS[:5], key=key)
    assert shards.n_bytes("val") == len(first.encode())
    assert tok.decode(np.concatenate(shards.tokens("val")).tolist()) == first + "<|endoftext|>"
    assert len(shards.tokens("train")) == 4 and all(isinstance(a, np.memmap) for a in shards.tokens("train"))
    one = write_shards(DOCS[:1], tok, tmp_path / "one", val_fraction=0.5)
    assert one.n_documents("train") + one.n_documents("val") == 1
    with pytest.raises(FelixError, match="no 'test' split"):
        one.n_tokens("test")


def test_a_small_val_split_is_topped_up_to_min_val_tokens_by_lowest_hash(tiny_mix, tmp_path):
    tok = tiny_mix.tokenizer
    lengths = {d: len(tok.encode(d)) + 1 for d in DOCS[:40]}
    plain = write_shards(DOCS[:40], tok, tmp_path / "plain", val_fraction=0.02, seed=3)
    next_up = sorted(_documents(tok, plain, "train"), key=lambda d: key(d, 3))[:3]
    want = plain.n_tokens("val") + sum(lengths[d] for d in next_up)
    topped = write_shards(DOCS[:40], tok, tmp_path / "topped", val_fraction=0.02, seed=3, min_val_tokens=want)
    assert topped.n_tokens("val") == want > plain.n_tokens("val")
    assert topped.n_tokens("train") + topped.n_tokens("val") == sum(lengths.values())
    val, train = _documents(tok, topped, "val"), _documents(tok, topped, "train")
    assert sorted(val + train) == sorted(DOCS[:40])
    # the top-up is the train documents closest to the val threshold, wherever they stand in the input
    assert set(val) - set(_documents(tok, plain, "val")) == set(next_up)
    # never more than a quarter of the documents, however many tokens are asked for
    greedy = write_shards(DOCS[:40], tok, tmp_path / "greedy", val_fraction=0.0, min_val_tokens=10**9)
    assert greedy.n_documents("val") == 10 and greedy.n_documents("train") == 30
    with pytest.raises(FelixError, match="min_val_tokens"):
        write_shards(DOCS, tok, tmp_path / "x", min_val_tokens=-1)


def _documents(tok, shards: ShardSet, split: str) -> list[str]:
    return tok.decode(np.concatenate(shards.tokens(split)).tolist()).split("<|endoftext|>")[:-1]


def test_held_out_documents_stay_held_out_when_the_input_grows_or_is_reordered(tiny_mix, tmp_path):
    """Val was chosen by position: one document prepended moved most of the old val documents into train,
    so a model trained on the grown corpus saw text it is measured on. A document's hash now decides."""
    tok = tiny_mix.tokenizer
    old = write_shards(DOCS, tok, tmp_path / "old", val_fraction=0.1, seed=5)
    grown = ["document new: a text that was not there before"] + DOCS[100:] + DOCS[:100][::-1]
    new = write_shards(grown, tok, tmp_path / "new", val_fraction=0.1, seed=5)
    old_val = set(_documents(tok, old, "val"))
    assert len(old_val) >= 10 and old_val <= set(_documents(tok, new, "val"))
    assert set(_documents(tok, old, "train")) <= set(_documents(tok, new, "train"))
    # the min_val_tokens top-up depends on the documents, not on their order
    small = DOCS[:40]
    a = write_shards(small, tok, tmp_path / "a", val_fraction=0.02, min_val_tokens=300)
    b = write_shards(small[::-1], tok, tmp_path / "b", val_fraction=0.02, min_val_tokens=300)
    assert a.n_documents("val") > 1 and sorted(_documents(tok, a, "val")) == sorted(_documents(tok, b, "val"))


def test_same_seed_same_shards_and_existing_dirs_are_handled(tiny_mix, tmp_path):
    tok = tiny_mix.tokenizer
    a = write_shards(DOCS, tok, tmp_path / "a", val_fraction=0.2, seed=5).meta
    b = write_shards(DOCS, tok, tmp_path / "b", val_fraction=0.2, seed=5).meta
    c = write_shards(DOCS, tok, tmp_path / "c", val_fraction=0.2, seed=6).meta
    assert a == b and a["splits"]["val"] != c["splits"]["val"]
    # re-sharding replaces a shard directory whole; any other non-empty directory is left alone
    again = write_shards(DOCS[:20], tok, tmp_path / "a", val_fraction=0.2)
    assert again.n_documents("train") + again.n_documents("val") == 20
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FelixError, match="not a shard directory; refusing"):
        write_shards(DOCS, tok, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    # nor a shard directory that holds anything else (a source kept beside its shards, a subdirectory)
    (tmp_path / "a" / "docs.jsonl").write_text('{"text": "precious"}\n')
    with pytest.raises(FelixError, match=r"a: exists and is not a shard directory; .*holds docs\.jsonl"):
        write_shards(DOCS[:20], tok, tmp_path / "a")
    assert (tmp_path / "a" / "docs.jsonl").is_file() and ShardSet.open(tmp_path / "a").n_documents("train") > 0
    (tmp_path / "a" / "docs.jsonl").unlink()
    (tmp_path / "a" / "train-00007.bin").mkdir()
    with pytest.raises(FelixError, match=r"holds train-00007\.bin"):
        write_shards(DOCS[:20], tok, tmp_path / "a")
    with pytest.raises(FelixError, match="val_fraction"):
        write_shards(DOCS, tok, tmp_path / "x", val_fraction=1.0)


def test_overlong_shard_and_missing_index_are_named(tiny_mix, tmp_path):
    write_shards(DOCS, tiny_mix.tokenizer, tmp_path / "s", val_fraction=0.1)
    with open(tmp_path / "s" / "val-00000.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(FelixError, match="val-00000.bin: shard longer than its index entry"):
        ShardSet.open(tmp_path / "s", verify=False)
    (tmp_path / "s" / "index.json").unlink()
    with pytest.raises(FelixError, match="not a shard directory"):
        ShardSet.open(tmp_path / "s")


def test_text_sources_stream_documents(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n<|endoftext|>\n\n<|endoftext|>\nsecond <|endoftext|> inline\n")
    assert list(iter_documents(txt)) == ["first doc\nline two", "second <|endoftext|> inline\n"]
    (tmp_path / "b.txt").write_text("one whole document\n\nwith a blank line")
    assert list(iter_documents(tmp_path / "b.txt")) == ["one whole document\n\nwith a blank line"]
    # a raw U+2028 inside a JSON string is not a line break
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "c.jsonl")) == ["a\u2028b"]
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(FelixError, match="blank.txt: file is empty"):
        list(iter_documents(tmp_path / "blank.txt"))
    with pytest.raises(FelixError, match='notext.jsonl: line 1: expected an object with a string "text"'):
        list(iter_documents(tmp_path / "notext.jsonl"))
    with pytest.raises(FelixError, match="missing.jsonl: cannot read"):
        list(iter_documents(tmp_path / "missing.jsonl"))


def test_example_mix_expresses_the_briefs_seven_sources(tmp_path):
    import yaml

    example = Path(__file__).parents[1] / "docs" / "mix-example.yaml"
    raw = yaml.safe_load(example.read_text())
    targets = DataMix.model_validate(raw).targets()
    brief = {"pes2o_neuro": 0.22, "code": 0.28, "fineweb": 0.18, "pes2o_cs": 0.10, "stackoverflow": 0.08,
             "json": 0.05, "commits": 0.05}
    assert targets == pytest.approx({k: v / sum(brief.values()) for k, v in brief.items()})
    # its paths are placeholders, and loading says which source lacks shards
    with pytest.raises(FelixError, match="mix-example.yaml: source 'pes2o_neuro': no shards"):
        DataMix.load(example)


def test_mix_resolves_relative_paths_and_rejects_odd_fields(tiny_mix, tmp_path):
    mix = DataMix.load(tiny_mix.mix_path)
    assert mix.path == tiny_mix.mix_path and mix.sources[0].shards == (tiny_mix.root / "shards" / "code").resolve()
    assert mix.targets() == pytest.approx({"code": 0.7, "prose": 0.3})
    bad = tmp_path / "bad.yaml"
    for text, msg in [(f"path: x\nsources:\n  - {{name: a, shards: {tiny_mix.root}/shards/code, weight: 1}}\n",
                       "path: unknown key"),
                      (f"sources:\n  - {{name: a, shards: {tiny_mix.root}/shards/code, weight: .inf}}\n", "finite"),
                      ("sources: []\n", "at least one source"), ("- just a list\n", "top level must be a mapping")]:
        bad.write_text(text)
        with pytest.raises(FelixError, match=f"bad.yaml: .*{msg}"):
            DataMix.load(bad)


@pytest.mark.parametrize(("mutate", "msg"), [
    (lambda m: m["splits"]["train"]["files"][0].pop("sha256"), r"splits\.train\.files\[0\] must be an object"),
    (lambda m: m["splits"]["train"]["files"][0].pop("n_tokens"), r"splits\.train\.files\[0\] must be an object"),
    (lambda m: m["splits"]["train"]["files"][0].update(file="../elsewhere.bin"),
     r"splits\.train\.files\[0\]\.file must be a file name"),
    (lambda m: m.update(splits=[]), "splits must be an object"),
    (lambda m: m.update(format_version="1"), "format_version must be a non-negative integer"),
    (lambda m: m.update(dtype="float32"), "dtype must name an integer dtype"),
    (lambda m: m["splits"]["train"].update(files=None), r"splits\.train must be an object with a files list"),
    (lambda m: m["splits"]["val"].update(n_tokens=m["splits"]["val"]["n_tokens"] + 1),
     r"splits\.val\.n_tokens \(\d+\) is not the sum"),
])
def test_malformed_index_is_named(tiny_mix, tmp_path, mutate, msg):
    write_shards(DOCS, tiny_mix.tokenizer, tmp_path / "s", val_fraction=0.1)
    index = tmp_path / "s" / "index.json"
    meta = json.loads(index.read_text())
    mutate(meta)
    index.write_text(json.dumps(meta))
    with pytest.raises(FelixError, match=f"index.json: malformed shard index: {msg}"):
        ShardSet.open(tmp_path / "s", verify=False)


def test_write_shards_refuses_to_replace_a_file(tiny_mix, tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text('{"text": "precious"}\n')
    with pytest.raises(FelixError, match="data.jsonl: exists and is not a directory"):
        write_shards(DOCS, tiny_mix.tokenizer, target)
    assert target.read_text() == '{"text": "precious"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def grouped_documents(n_groups: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, group) with 1 to 5 documents a group, the groups' documents scattered through the input."""
    rng = random.Random(seed)
    docs = [(f"group {g} copy {i}: " + "lorem ipsum " * rng.randint(1, 30), f"g{g}")
            for g in range(n_groups) for i in range(rng.randint(1, 5))]
    rng.shuffle(docs)
    return docs


@pytest.mark.parametrize(("val_fraction", "min_val_tokens"), [(0.0, 0), (0.2, 0), (0.0, 300), (0.05, 2000),
                                                              (0.0, 10**6)])
def test_a_group_lands_whole_on_one_side_whatever_the_top_up(tiny_mix, tmp_path, val_fraction, min_val_tokens):
    tok = tiny_mix.tokenizer
    docs = grouped_documents(40)
    shards = write_shards(docs, tok, tmp_path / "s", val_fraction=val_fraction, min_val_tokens=min_val_tokens,
                          seed=3)
    sides = {s: [t.split(":")[0].rsplit(" copy", 1)[0] for t in split_documents(shards, s, tok)]
             for s in ("train", "val")}
    assert not set(sides["train"]) & set(sides["val"]) and sides["train"] and sides["val"]
    assert len(sides["train"]) + len(sides["val"]) == len(docs)
    size = {g: sum(1 for _, name in docs if name == f"g{g.split()[1]}") for g in sides["val"]}
    assert all(sides["val"].count(g) == size[g] for g in sides["val"])  # every document of a val group
    if val_fraction == 0:  # topped up group by group, lowest hash first, past a quarter only for the first group
        assert shards.n_tokens("val") >= min_val_tokens or len(sides["val"]) + 5 > len(docs) // 4
        assert len(sides["val"]) <= max(len(docs) // 4, max(size.values()))


def test_one_group_stays_in_train_and_two_give_val_one(tiny_mix, tmp_path):
    tok = tiny_mix.tokenizer
    one = write_shards([(f"copy {i}", "g") for i in range(8)], tok, tmp_path / "one", val_fraction=0.0)
    assert one.n_documents("train") == 8 and one.n_documents("val") == 0
    two = write_shards([(f"copy {i}", f"g{i % 2}") for i in range(8)], tok, tmp_path / "two", val_fraction=0.0)
    assert two.n_documents("val") == 4 and two.n_documents("train") == 4  # one whole group, past the quarter


def test_every_document_hashing_into_val_is_no_crash(tiny_mix, tmp_path):
    """Before: with no train document held back (all hashed below val_fraction), the top-up raised a bare
    `ValueError: zip() argument 2 is longer than argument 1`."""
    docs = [d for d in DOCS[:40] if key(d) < 0.9][:3]
    shards = write_shards(docs, tiny_mix.tokenizer, tmp_path / "s", val_fraction=0.9)
    assert shards.n_documents("val") == 3 and shards.n_documents("train") == 0


def test_sidecars_come_with_the_shards_and_only_known_names(tiny_mix, tmp_path):
    tok, out = tiny_mix.tokenizer, tmp_path / "s"
    write_shards(DOCS[:10], tok, out, sidecars={SYNTH_MIX_MARKER: "{}\n"})
    assert (out / SYNTH_MIX_MARKER).read_text(encoding="utf-8") == "{}\n"
    write_shards(DOCS[:10], tok, out)  # a re-shard replaces them
    assert not (out / SYNTH_MIX_MARKER).exists()
    with pytest.raises(FelixError, match="notes.txt is not a file a shard directory may hold"):
        write_shards(DOCS[:10], tok, tmp_path / "t", sidecars={"notes.txt": ""})
    assert not (tmp_path / "t").exists()
