"""The text `felix tokenizer train` learns BPE from: every document of its sources, or a seeded sample of about
N bytes drawn from all of them, streamed either way.

BPE training holds every distinct word it has seen (~1.3 KB each), so on a corpus of many GB it needs tens of
GB and CPU-hours; a few GB drawn from every source learn much the same merges. The draw is SentencePiece's
`input_sentence_size` made streaming: each document is kept or not by a seeded hash of its text against one
keep-probability, N over the inputs' estimated text. One probability for all sources represents each in
proportion to its size: the data mix's weights are not known here, and an even split would oversample a small
source (or ask more of it than it holds). Whole documents only; by content, not position, so the same
documents are drawn whatever order the files or their lines come in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from felix.chat import ChatDocument
from felix.corpus import TXT_SEPARATOR, check_source, iter_documents, source_kind
from felix.errors import FelixError

# The head of each file read to learn its bytes of text per byte on disk: JSON quoting and escapes (`\u00e9` is
# 6 bytes on disk for 2 of text, `\n` 2 for 1) and .txt separators make a file larger than its text.
CALIBRATION_BYTES = 1 << 20


@dataclass
class SourceUse:
    """What training took from one source: its documents and bytes of text read, and of those used."""

    path: Path
    documents_read: int = 0
    bytes_read: int = 0
    documents: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        """JSON-ready, the path as a string."""
        return {**asdict(self), "path": str(self.path)}


def sample_key(data: bytes, seed: int) -> float:
    """A document's place in [0, 1) by a seeded hash of its text. Personalized apart from the hash `felix data
    shard` holds val out by, so that with the same seed the sample is not exactly val plus train documents."""
    h = hashlib.blake2b(data, digest_size=8, key=str(seed).encode(), person=b"tokenizer sample")
    return int.from_bytes(h.digest(), "little") / 2**64


def _record_text_bytes(line: bytes) -> int:
    try:
        record = json.loads(line)
    except ValueError:
        return 0  # the real read names the line; here it only adds nothing to the estimate
    if not isinstance(record, dict):
        return 0
    if isinstance(record.get("text"), str):
        return len(record["text"].encode("utf-8", "replace"))
    messages = record.get("messages")
    return sum(len(m["content"].encode("utf-8", "replace")) for m in messages
               if isinstance(m, dict) and isinstance(m.get("content"), str)) if isinstance(messages, list) else 0


def text_per_file_byte(path: Path) -> float:
    """Bytes of training text per byte of `path`, estimated from its first CALIBRATION_BYTES (1.0 where that
    holds no whole line: documents longer than it, whose escapes are the only overhead)."""
    with open(path, "rb") as f:
        head = f.read(CALIBRATION_BYTES)
    lines = head.split(b"\n")
    if len(head) == CALIBRATION_BYTES:
        lines.pop()  # cut short by the read
    on_disk = sum(len(line) + 1 for line in lines)
    if source_kind(path) == "jsonl":
        text = sum(_record_text_bytes(line) for line in lines if line.strip())
    else:
        text = sum(len(line.rstrip(b"\r")) + 1 for line in lines if line.rstrip(b"\r") != TXT_SEPARATOR.encode())
    return text / on_disk if text and on_disk else 1.0


class TrainingText:
    """The texts BPE trains on, streamed from `files` in order: a chat's turn contents, any other document
    whole. With `sample_bytes`, about that many bytes of text: a document is kept when its `sample_key` is
    below one keep-probability (`keep`); a source the draw took nothing from gives its lowest-keyed document,
    so every source is represented. `sources` counts what each gave, complete once iterated."""

    def __init__(self, files: Sequence[Path], sample_bytes: int | None = None, seed: int = 0):
        if sample_bytes is not None and (isinstance(sample_bytes, bool) or not isinstance(sample_bytes, int)
                                         or sample_bytes < 1):
            raise FelixError(f"sample_bytes must be a positive number of bytes, got {sample_bytes!r}")
        for path in files:
            check_source(path)  # before the sizes are read
        self.files, self.sample_bytes, self.seed = [Path(p) for p in files], sample_bytes, seed
        self.keep = 1.0
        if sample_bytes is not None:
            try:
                estimate = sum(p.stat().st_size * text_per_file_byte(p) for p in self.files)
            except OSError as exc:
                raise FelixError(f"{exc.filename}: cannot read ({exc.strerror or exc})") from None
            self.keep = min(1.0, sample_bytes / estimate) if estimate > 0 else 1.0
        self.sources = [SourceUse(p) for p in self.files]

    def __iter__(self) -> Iterator[str]:
        self.sources = [SourceUse(p) for p in self.files]
        for use in self.sources:
            yield from self._source(use)

    def _source(self, use: SourceUse) -> Iterator[str]:
        fallback: tuple[float, list[str], int] | None = None  # held only until the draw keeps a document
        for doc in iter_documents(use.path):  # it refuses text UTF-8 cannot hold, naming the file and line
            # its role markers are special tokens: BPE learns the contents
            texts = [text for _, text in doc.turns if text] if isinstance(doc, ChatDocument) else [doc]
            n = sum(len(t.encode("utf-8")) for t in texts)
            use.documents_read += 1
            use.bytes_read += n
            if self.keep < 1.0:
                key = sample_key(doc.encode("utf-8"), self.seed)
                if key >= self.keep:
                    if not use.documents and (fallback is None or key < fallback[0]):
                        fallback = (key, texts, n)
                    continue
                fallback = None
            use.documents += 1
            use.bytes += n
            yield from texts
        if fallback is not None and not use.documents:
            use.documents, use.bytes = 1, fallback[2]
            yield from fallback[1]

    @property
    def report(self) -> dict:
        """What was asked and what each source gave, JSON-ready (for the CLI's output)."""
        return {"sample_bytes": self.sample_bytes, "seed": self.seed if self.sample_bytes is not None else None,
                "keep_probability": self.keep, "documents": sum(s.documents for s in self.sources),
                "bytes": sum(s.bytes for s in self.sources), "sources": [s.as_dict() for s in self.sources]}
