"""Tokenized shards: flat files of token ids (documents separated by <|endoftext|>) read as memmaps,
with an `index.json` holding sizes and sha256 checksums so truncation and corruption are caught."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from felix.atomic import atomic_dir
from felix.errors import FelixError
from felix.tokenizer import FelixTokenizer

INDEX = "index.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def _val_document(i: int, seed: int, val_fraction: float) -> bool:
    """Whole documents go to val by a seeded hash of their position, stable across re-runs."""
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


class _SplitWriter:
    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[dict] = []
        self.n_documents = self.n_bytes = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        self.buf.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        self.n_documents += 1
        self.n_bytes += n_bytes
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buf).tobytes()
        name = f"{self.split}-{len(self.files):05d}.bin"
        (self.out_dir / name).write_bytes(data)
        self.files.append({"file": name, "n_tokens": self.buffered, "sha256": hashlib.sha256(data).hexdigest()})
        self.buf, self.buffered = [], 0


def write_shards(documents: Iterable[str], tokenizer: FelixTokenizer, out_dir: Path, val_fraction: float = 0.005,
                 shard_tokens: int = 2**24, seed: int = 0, batch_docs: int = 256) -> ShardSet:
    """Tokenize documents into `out_dir` (train/val shards + index.json), all or nothing."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        index, batch = 0, []

        def drain() -> None:
            nonlocal index
            for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
                ids.append(tokenizer.eot_id)
                split = "val" if _val_document(index, seed, val_fraction) else "train"
                writers[split].add(ids, len(text.encode("utf-8")))
                index += 1
            batch.clear()

        for doc in documents:
            batch.append(doc)
            if len(batch) >= batch_docs:
                drain()
        drain()
        if index == 0:
            raise FelixError(f"{out_dir}: no documents to shard")
        if index >= 2 and writers["val"].n_documents == 0:  # keep a validation split, however small
            _move_last_train_document(writers)
        for w in writers.values():
            w.flush()
        meta = {
            "format_version": FORMAT_VERSION, "dtype": dtype.name, "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
            "splits": {s: {"files": w.files, "n_tokens": sum(f["n_tokens"] for f in w.files),
                           "n_documents": w.n_documents, "n_bytes": w.n_bytes} for s, w in writers.items()},
        }
        (tmp / INDEX).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return ShardSet.open(out_dir)


def _move_last_train_document(writers: dict[str, _SplitWriter]) -> None:
    train = writers["train"]
    if not train.buf:  # already flushed: leave the split as is rather than rewrite a file
        return
    last = train.buf.pop()
    train.buffered -= len(last)
    train.n_documents -= 1
    writers["val"].buf.append(last)
    writers["val"].buffered += len(last)
    writers["val"].n_documents += 1


@dataclass
class ShardSet:
    """A verified shard directory; token arrays are memory-mapped, never read whole."""

    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> ShardSet:
        root = Path(root)
        index = root / INDEX
        if not index.is_file():
            raise FelixError(f"{root}: not a shard directory (no {INDEX})")
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
            itemsize = np.dtype(meta["dtype"]).itemsize
            splits = meta["splits"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FelixError(f"{index}: unreadable shard index ({exc})") from None
        for split in SPLITS:
            for f in splits.get(split, {}).get("files", []):
                path = root / f["file"]
                if not path.is_file():
                    raise FelixError(f"{path}: shard listed in {INDEX} is missing")
                size = path.stat().st_size
                if size != f["n_tokens"] * itemsize:
                    raise FelixError(f"{path}: truncated shard ({size} bytes, index says "
                                     f"{f['n_tokens'] * itemsize})")
                if verify and hashlib.sha256(path.read_bytes()).hexdigest() != f["sha256"]:
                    raise FelixError(f"{path}: corrupted shard (sha256 does not match {INDEX})")
        return cls(root, meta)

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    def n_tokens(self, split: str) -> int:
        return self.meta["splits"][split]["n_tokens"]

    def n_bytes(self, split: str) -> int:
        return self.meta["splits"][split]["n_bytes"]

    def n_documents(self, split: str) -> int:
        return self.meta["splits"][split]["n_documents"]

    def arrays(self, split: str) -> list[np.ndarray]:
        """One read-only memmap per shard file of `split`."""
        dtype = np.dtype(self.meta["dtype"])
        return [np.memmap(self.root / f["file"], dtype=dtype, mode="r")
                for f in self.meta["splits"][split]["files"] if f["n_tokens"]]
