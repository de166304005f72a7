"""Shards and the data mix: layout, checksums, clear errors, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from felix.corpus import iter_documents
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.shards import ShardSet, write_shards

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
    with pytest.raises(FelixError, match=r"mix.yaml: invalid data mix.*weight.*unknown key"):
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
