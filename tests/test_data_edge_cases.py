"""Data path at its edges: lone surrogates and empty texts in JSONL sources, a source of more shard files than
the soft open-files limit, a damaged corpus manifest."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from felix.corpus import MANIFEST, build_stdlib_corpus, iter_documents
from felix.dataloader import MixLoader
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.shards import INDEX, write_shards

N_FILES = 200


@pytest.fixture(scope="module")
def many_files(tiny_mix, tmp_path_factory) -> Path:
    """A shard directory of about N_FILES train files (one per document)."""
    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(N_FILES + 20)]
    out = tmp_path_factory.mktemp("many") / "shards"
    shards = write_shards(docs, tiny_mix.tokenizer, out, val_fraction=0.0, shard_tokens=1)
    assert len(shards.meta["splits"]["train"]["files"]) >= N_FILES
    return out


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_a_source_of_more_shard_files_than_the_soft_limit_loads(many_files, tmp_path):
    """Each memmap holds a descriptor: a source of more shard files than the usual soft limit (1024) failed
    with a bare `OSError: Too many open files`. The soft limit is raised toward the hard one instead."""
    path = tmp_path / "mix.yaml"
    DataMix(sources=[MixSource(name="many", shards=many_files, weight=1.0)]).write(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < _open_files() + 2 * N_FILES:
        pytest.skip(f"hard open-files limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_files() + N_FILES // 2, hard))
    try:
        loader = MixLoader(DataMix.load(path), "train", 8, 4, seed=0)
        src = loader.sources[0]
        stream = np.concatenate(src.arrays)  # every file mapped at once
        assert len(src.arrays) >= N_FILES
        # and the windows read across the file boundaries are the stream's, each once per epoch
        assert sorted(tuple(src.window(k)) for k in range(src.n_windows)) == sorted(
            tuple(stream[i * 8: i * 8 + 9]) for i in range(src.n_windows))
    finally:
        loader = src = None
        gc.collect()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hard_limit_too_low_for_the_shard_files_names_the_index(many_files):
    """Where even the hard limit cannot hold them, the error names the shard set and the limit."""
    code = ("import resource, sys\n"
            "from felix.shards import ShardSet\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            f"ShardSet.open({str(many_files)!r}, verify=False).arrays('train')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("felix.errors.FelixError: ") and str(many_files / INDEX) in last and "ulimit -n" in last


def test_a_lone_surrogate_in_a_jsonl_source_names_file_and_line(tiny_mix, tmp_path):
    """A JSON "\\ud800" escape is valid JSON but not Unicode text: it failed inside the tokenizer as
    'cannot encode text: text 1', naming neither the file nor the line."""
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n', encoding="utf-8")
    out = tmp_path / "shards"
    with pytest.raises(FelixError, match=rf"{src}: line 2: .*lone surrogate"):
        write_shards(iter_documents(src), tiny_mix.tokenizer, out)
    assert not out.exists() and not list(tmp_path.glob(".shards*"))


def test_a_jsonl_source_of_only_empty_texts_is_named(tmp_path):
    """It yielded nothing without a word: among several inputs it silently added no documents."""
    src = tmp_path / "empty_texts.jsonl"
    src.write_text('{"text": ""}\n\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(FelixError, match=rf"{src}: no documents \(every \"text\" is empty or whitespace\)"):
        list(iter_documents(src))
    src.write_text('{"text": ""}\n{"text": "one"}\n', encoding="utf-8")
    assert list(iter_documents(src)) == ["one"]


def test_a_damaged_corpus_manifest_is_rebuilt(tmp_path):
    """A corpus.json that parses but is not an object crashed with AttributeError instead of a rebuild."""
    out = tmp_path / "corpus"
    out.mkdir()
    (out / MANIFEST).write_text("[]", encoding="utf-8")
    sources = build_stdlib_corpus(out, max_bytes=20_000)
    assert all(p.stat().st_size > 0 for p in sources.values())
    assert json.loads((out / MANIFEST).read_text(encoding="utf-8"))["params"]["max_bytes"] == 20_000
