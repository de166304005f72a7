"""What keeps `felix data shard` and shard verification scaling to a 30B-token corpus (docs/benchmarks.md, "The
data pipeline at scale"): documents are read while the tokenizer encodes, checksums are computed side by side,
and the ids never depend on either."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_trainer import felix_cmd, write_config

from felix import shards as shards_mod
from felix.errors import FelixError
from felix.shards import ShardSet, write_shards
from felix.tokenizer import FelixTokenizer

DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet, " * (i % 9 + 1) + "é😀\n" * (i % 3) for i in range(60)]


class _WaitsForTheNextBatch(FelixTokenizer):
    """The tiny tokenizer, whose first batch waits (up to 10 s) until the documents of the next one are read."""

    def __init__(self, tok: FelixTokenizer, read: threading.Event):
        super().__init__(tok.hf, tok.path)
        self.read, self.overlapped = read, []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self.overlapped:
            self.overlapped.append(self.read.wait(timeout=10))
        return super().encode_batch(texts)


def test_documents_are_read_while_the_tokenizer_encodes(tiny_mix, tmp_path):
    """write_shards waited for each batch's ids before reading another document: the reading, hashing and routing
    (serial Python) added to the tokenizer's time instead of running beside it."""
    read = threading.Event()

    def documents():
        for i, doc in enumerate(DOCS):
            if i == 2:  # batch_docs=2: the first document of the next batch
                read.set()
            yield doc

    tok = _WaitsForTheNextBatch(tiny_mix.tokenizer, read)
    shards = write_shards(documents(), tok, tmp_path / "s", val_fraction=0.1, batch_docs=2)
    assert tok.overlapped == [True]
    ids = np.concatenate(shards.tokens("train") + shards.tokens("val"))
    written = sorted(tuple(d) for d in np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1])
    assert written == sorted(tuple(tok.encode(d) + [tok.eot_id]) for d in DOCS)


@pytest.mark.parametrize(("batch_docs", "batch_chars"), [(1, 1), (3, 40), (256, 1 << 20)])
def test_shards_are_the_same_whatever_the_batches(tiny_mix, tmp_path, batch_docs, batch_chars):
    """A document's pieces may span batches, one being encoded while the next fills: same files, byte for byte."""
    tok = tiny_mix.tokenizer
    docs = [*DOCS, " ".join(DOCS)]  # one long enough to be cut in pieces below
    reference = write_shards(docs, tok, tmp_path / "ref", val_fraction=0.1, shard_tokens=700, min_val_tokens=300)
    shards = write_shards(docs, tok, tmp_path / "s", val_fraction=0.1, shard_tokens=700, min_val_tokens=300,
                          batch_docs=batch_docs, batch_chars=batch_chars)
    assert shards.meta == reference.meta


def test_batches_encode_to_the_ids_of_encoding_with_offsets(tiny_mix):
    """encode_batch skips the offsets it never reads (encode_batch_fast): the ids are the library's own."""
    tok = tiny_mix.tokenizer
    texts = [*DOCS[:8], "", "  \n\t x", "a <|endoftext|> b", "ünïcödé e\u0301 日本語 🙂 \u2028 \x85"]
    assert tok.encode_batch(texts) == [e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture
def many_shards(tiny_mix, tmp_path):
    return write_shards(DOCS * 3, tiny_mix.tokenizer, tmp_path / "s", val_fraction=0.1, shard_tokens=300).root


def test_shard_checksums_are_computed_side_by_side(many_shards, monkeypatch):
    """Every training start checksums the whole mix (data.verify_checksums): one file after another, a 30B-token
    set (~60 GB) took a core-minute or more per start and rank; now VERIFY_THREADS files are hashed at once."""
    monkeypatch.setattr(shards_mod, "available_cpus", lambda: 4)  # the test machine may have fewer
    real, calls, lock = shards_mod._file_sha256, itertools.count(), threading.Lock()
    meet = threading.Barrier(2, timeout=10)  # the first two files meet only if hashed at the same time

    def hashing(path):
        with lock:
            first_two = next(calls) < 2
        if first_two:
            meet.wait()
        return real(path)

    monkeypatch.setattr(shards_mod, "_file_sha256", hashing)
    assert len(ShardSet.open(many_shards).files("train")) > 4


def test_the_first_corrupted_shard_in_index_order_is_named(many_shards):
    files = ShardSet.open(many_shards).files("train")
    for f in (files[3], files[1]):  # hashed side by side, the earlier one still named
        data = bytearray(f.read_bytes())
        data[0] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(FelixError, match=f"{files[1].name}: corrupted shard"):
        ShardSet.open(many_shards)


def test_a_share_hashes_only_its_files(many_shards):
    """The ranks on a node hash the shards between them: each of n processes every n-th file."""
    files = ShardSet.open(many_shards).files("train")
    data = bytearray(files[1].read_bytes())
    data[0] ^= 0xFF
    files[1].write_bytes(bytes(data))
    ShardSet.open(many_shards, share=(0, 2))  # files 0, 2, 4, ...
    for share in ((1, 2), (0, 1)):
        with pytest.raises(FelixError, match=f"{files[1].name}: corrupted shard"):
            ShardSet.open(many_shards, share=share)


@pytest.mark.slow  # three processes that import torch
def test_under_torchrun_a_shard_one_rank_finds_corrupted_stops_every_rank_naming_it(tiny_mix, tmp_path):
    """Rank 1 alone hashes the file; rank 0, which did not, must stop too rather than wait in the first
    collective for a rank that has gone."""
    root = Path(shutil.copytree(tiny_mix.root, tmp_path / "mix"))
    mix = type(tiny_mix)(root, root / "tokenizer.json", root / "mix.yaml")
    index = json.loads((root / "shards" / "code" / "index.json").read_text())
    second = root / "shards" / "code" / [f["file"] for s in ("train", "val") for f in index["splits"][s]["files"]][1]
    data = bytearray(second.read_bytes())
    data[0] ^= 0xFF
    second.write_bytes(bytes(data))
    cfg = write_config(tmp_path, mix, max_steps=2, eval_every=0)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *felix_cmd("train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                                      "--no-progress")[1:]],
                          capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count(f"{second}: corrupted shard") == 2, proc.stderr[-3000:]
