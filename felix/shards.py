"""Tokenized shards: flat files of token ids (documents separated by <|endoftext|>) read as memmaps,
with an `index.json` holding sizes and sha256 checksums so truncation and corruption are caught."""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from felix.atomic import atomic_dir, check_output
from felix.corpus import surrogate_problem
from felix.cpus import available_cpus
from felix.errors import FelixError
from felix.tokenizer import FelixTokenizer

try:
    import resource
except ImportError:  # Windows: no RLIMIT_NOFILE
    resource = None

INDEX = "index.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
SYNTH_MIX_MARKER = "synth-mix.json"  # `felix synth mix` marks the shards it writes (felix.synth_heldout)
SIDECARS = (SYNTH_MIX_MARKER,)  # what other felix writers keep beside a shard set; a re-shard replaces them
PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 20  # characters tokenized at once: the tokenizer holds ~200 bytes per token while it works
FD_HEADROOM = 256  # descriptors left free beside the memmaps (checkpoints, logs, CUDA, DDP sockets)
# Shard files checksummed at once: hashlib and file reads let go of the GIL, so threads read and hash files side
# by side (a 30B-token set is ~60 GB, and every training start verifies it); past 8, storage is the limit.
VERIFY_THREADS = 8


def _document_key(data: bytes, seed: int) -> float:
    """A document's place in [0, 1) by a seeded hash of its content: below val_fraction it is held out, and
    the top-up takes train documents from the bottom up. Content, not position, so that adding, removing or
    reordering other documents never moves a held-out one into train (nor a trained-on one into val)."""
    h = hashlib.blake2b(data, digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") / 2**64


class _SplitWriter:
    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[dict] = []
        self.n_documents = self.n_bytes = self.n_tokens = 0

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        self.buf.append(ids)
        self.buffered += len(ids)
        self.n_documents += 1
        self.n_bytes += n_bytes
        self.n_tokens += len(ids)
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


@dataclass
class _Document:
    """A document being tokenized: its pieces' ids as they come back from the tokenizer."""

    index: int  # in the input: breaks ties between copies of one text
    n_bytes: int
    key: float
    parts: list[np.ndarray]
    group: int  # one side of the split for a whole group: a plain document's index, a named group's -1, -2, ...
    queued: bool = False  # all its pieces are in a batch
    waiting: int = 0  # of its pieces, those whose ids have not come back yet


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of equal neighbours in `values`."""
    starts = [i for i in range(len(values)) if i == 0 or values[i] != values[i - 1]]
    return list(zip(starts, [*starts[1:], len(values)] if starts else [], strict=True))


def _shard_file(name: str) -> bool:
    """Whether `name` is a file a shard directory holds (what `write_shards` writes, or a SIDECAR)."""
    return name == INDEX or name in SIDECARS or re.fullmatch(r"(train|val)-\d{5,}\.bin", name) is not None


def check_shard_output(out_dir: Path) -> None:
    """Refuse to replace `out_dir` (atomic_dir swaps it whole) unless it is empty or holds only what a
    shard run writes: a source or tokenizer kept there, or any other file, would be deleted with it."""
    check_output(out_dir, directory=True)  # a file there (atomic_dir would swap it out) or on the way to it
    if not out_dir.is_dir():
        return
    if foreign := sorted(p.name for p in out_dir.iterdir() if not (_shard_file(p.name) and p.is_file())):
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FelixError(f"{out_dir}: exists and is not a shard directory; refusing to replace it (it holds "
                         f"{listed}, which a shard run does not write and replacing the directory would delete)")


def write_shards(documents: Iterable[str | tuple[str, str]], tokenizer: FelixTokenizer, out_dir: Path,
                 val_fraction: float = 0.005, shard_tokens: int = 2**24, seed: int = 0, batch_docs: int = 256,
                 min_val_tokens: int = 0, batch_chars: int = BATCH_CHARS,
                 sidecars: dict[str, str] | None = None) -> ShardSet:
    """Tokenize documents into `out_dir` (train/val shards + index.json), all or nothing.

    Each document is followed by `eot_id`. A document goes to val when a seeded hash of its text is below
    `val_fraction`, wherever it stands in the input. When that gives val fewer than `min_val_tokens` tokens,
    the train documents of lowest hash move to val until it has them (a source grown since may need fewer),
    but val never takes more than a quarter of the documents; with two or more documents val always gets at
    least one. A document given as (text, group) is hashed by its group instead, and the documents of a group
    are moved, and counted against those limits, together, so they all land on one side (`felix synth mix`
    keeps a rephrasing with its original); the top-up never moves the last group train has. An existing shard
    directory is replaced; a file, or a directory holding anything else, is refused rather than overwritten.
    `sidecars` (name -> text, names from SIDECARS) are written into the directory with the shards, so that
    neither is ever there without the other. Documents longer than PIECE_CHARS are tokenized in pieces, and at
    most `batch_chars` characters at once, on a second thread: the tokenizer encodes one batch while the next
    is read.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise FelixError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_tokens < 0:
        raise FelixError(f"min_val_tokens must be >= 0, got {min_val_tokens}")
    if shard_tokens < 1:
        raise FelixError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if unknown := sorted(set(sidecars or {}) - set(SIDECARS)):
        raise FelixError(f"sidecars: {', '.join(unknown)} is not a file a shard directory may hold ({SIDECARS})")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    out_dir = Path(out_dir)
    check_shard_output(out_dir)
    eot = np.array([tokenizer.eot_id], dtype=dtype)

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]

    # the tokenizer's Rust side lets go of the GIL: reading, hashing and routing documents (serial, ~5% of the
    # CPU time on two cores, far more of the wall time on many) overlap with its encoding
    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(1, thread_name_prefix="felix-encode") as encoder:
        writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        # The train groups of lowest hash, at least one and at least `min_val_tokens` tokens of them, are held
        # back (a max-heap on the hash) so they can still top up a small val split at the end.
        held: list[tuple[float, int, int, np.ndarray, int]] = []  # (-key, group, index, ids, bytes)
        held_tokens = n_docs = 0
        group_tokens: dict[int, int] = {}  # tokens held, by group
        group_ids: dict[str, int] = {}  # the caller's group names
        released: set[int] = set()  # named groups gone to train: their later documents follow
        batch: list[tuple[_Document, str]] = []
        batch_len = 0
        in_flight: deque[_Document] = deque()  # documents with pieces in `batch` or `encoding`, in input order
        encoding: tuple[list[_Document], Future] | None = None  # the batch being encoded: its pieces' documents

        def route(doc: _Document) -> None:
            nonlocal held_tokens
            ids = np.concatenate([*doc.parts, eot])
            if doc.key < val_fraction:
                writers["val"].add(ids, doc.n_bytes)
                return
            if doc.group in released:
                writers["train"].add(ids, doc.n_bytes)
                return
            heapq.heappush(held, (-doc.key, doc.group, doc.index, ids, doc.n_bytes))
            held_tokens += len(ids)
            group_tokens[doc.group] = group_tokens.get(doc.group, 0) + len(ids)
            while len(group_tokens) > 1 and held_tokens - group_tokens[held[0][1]] >= min_val_tokens:
                group = held[0][1]
                while held and held[0][1] == group:
                    top = heapq.heappop(held)
                    writers["train"].add(top[3], top[4])
                held_tokens -= group_tokens.pop(group)
                if group < 0:  # a named group: more of its documents may follow
                    released.add(group)

        def collect() -> None:
            """The batch being encoded: its ids into their documents, and the documents now whole routed."""
            nonlocal encoding
            if encoding is not None:
                docs, future = encoding
                encoding = None
                for doc, ids in zip(docs, future.result(), strict=True):
                    doc.parts.append(ids)
                    doc.waiting -= 1
            while in_flight and in_flight[0].queued and not in_flight[0].waiting:
                route(in_flight.popleft())

        def drain() -> None:
            """Hand `batch` to the encoder, once it is done with the one before (at most two batches in memory)."""
            nonlocal batch_len, encoding
            collect()
            if batch:
                encoding = ([doc for doc, _ in batch], encoder.submit(encode, [piece for _, piece in batch]))
            batch.clear()
            batch_len = 0

        for given in documents:
            text, name = (given, None) if isinstance(given, str) else given
            if name is not None and not isinstance(name, str):
                raise FelixError(f"document {n_docs}: group must be a string, got {name!r}")
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (iter_documents names its file and line)
                raise FelixError(f"cannot encode text: document {n_docs}: {surrogate_problem(text)}") from None
            if name is None:
                doc = _Document(n_docs, len(data), _document_key(data, seed), [], group=n_docs)
            else:
                group = group_ids.setdefault(name, -1 - len(group_ids))
                doc = _Document(n_docs, len(data), _document_key(name.encode("utf-8"), seed), [], group=group)
            del data
            in_flight.append(doc)
            n_docs += 1
            for piece in tokenizer.text_pieces(text, PIECE_CHARS):
                batch.append((doc, piece))
                doc.waiting += 1
                batch_len += len(piece)
                if len(batch) >= batch_docs or batch_len >= batch_chars:
                    drain()
            doc.queued = True
        drain()
        collect()
        if n_docs == 0:
            raise FelixError(f"{out_dir}: no documents to shard")
        val, train, most = writers["val"], writers["train"], max(1, n_docs // 4)
        held.sort(key=lambda h: (-h[0], h[1], h[2]))  # lowest hash first, a group's documents together
        topping = True
        for start, end in _runs([h[1] for h in held]):
            # a group that would take val past a quarter, or leave train empty, ends the top-up
            topping = topping and (val.n_documents == 0 or (val.n_documents + end - start <= most
                                                            and val.n_tokens < min_val_tokens))
            topping = topping and (train.n_documents > 0 or end < len(held))
            for _, _, _, ids, n_bytes in held[start:end]:
                (val if topping else train).add(ids, n_bytes)
        for file, content in (sidecars or {}).items():
            (tmp / file).write_text(content, encoding="utf-8")
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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):  # shards are up to 64 MB: hash in chunks, never hold one whole
            h.update(chunk)
    return h.hexdigest()


def _verify_checksums(files: list[tuple[Path, str]], index: Path) -> None:
    """FelixError naming the first file, in index order, whose sha256 is not the one given; several files are
    hashed at once (VERIFY_THREADS at most, one per CPU)."""
    workers = max(1, min(VERIFY_THREADS, available_cpus(), len(files)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="felix-verify")
    try:  # map yields in order: the first mismatch in the index is the one named
        for (path, want), got in zip(files, pool.map(_file_sha256, [p for p, _ in files]), strict=True):
            if got != want:
                raise FelixError(f"{path}: corrupted shard (sha256 does not match {index.name})")
    finally:  # a mismatch found: the files still queued are not worth reading
        pool.shutdown(wait=True, cancel_futures=True)


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _index_problem(meta: object) -> str | None:
    """What is wrong with the structure of a parsed index.json (None: nothing), so that a hand-edited or
    foreign index fails with its file named instead of a KeyError somewhere later."""
    if not isinstance(meta, dict):
        return "top level is not an object"
    if not _count(meta.get("format_version")):
        return f"format_version must be a non-negative integer, got {meta.get('format_version')!r}"
    if not isinstance(meta.get("tokenizer_sha256"), str):
        return "tokenizer_sha256 must be a string"
    try:
        if np.dtype(meta.get("dtype")).kind not in "ui":
            raise TypeError
    except (TypeError, ValueError):
        return f"dtype must name an integer dtype, got {meta.get('dtype')!r}"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "splits must be an object"
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("files"), list):
            return f"splits.{name} must be an object with a files list"
        for key in ("n_tokens", "n_documents", "n_bytes"):
            if not _count(split.get(key)):
                return f"splits.{name}.{key} must be a non-negative integer, got {split.get(key)!r}"
        for i, f in enumerate(split["files"]):
            where = f"splits.{name}.files[{i}]"
            if not isinstance(f, dict) or not _count(f.get("n_tokens")) or not isinstance(f.get("sha256"), str):
                return f"{where} must be an object with integer n_tokens and string sha256"
            # a plain name: the index may only point at files of its own directory
            if not isinstance(f.get("file"), str) or Path(f["file"]).name != f["file"] or f["file"] in ("", ".", ".."):
                return f"{where}.file must be a file name in the shard directory, got {f.get('file')!r}"
        if sum(f["n_tokens"] for f in split["files"]) != split["n_tokens"]:
            return f"splits.{name}.n_tokens ({split['n_tokens']}) is not the sum of its files' n_tokens"
    return None


def check_token_ids(ids: np.ndarray, vocab: int, where: str | os.PathLike, offset: int, of: str) -> None:
    """FelixError naming `where` (the shard file `ids` were read from, at `offset`) when an id is outside
    0..vocab-1: past the model's embedding it would be a bare IndexError, on a GPU a device assert naming
    nothing. `of`: whose vocabulary `vocab` is, and what an id past it means."""
    if not ids.size or (ids.max() < vocab and (ids.dtype.kind == "u" or ids.min() >= 0)):
        return
    i = int(np.flatnonzero((ids < 0) | (ids >= vocab))[0])
    raise FelixError(f"{where}: token id {ids[i]} at position {offset + i} is outside the vocabulary "
                     f"(0..{vocab - 1}) of {of}")


@dataclass
class ShardSet:
    """A verified shard directory; token arrays are memory-mapped, never read whole."""

    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = True, share: tuple[int, int] = (0, 1)) -> ShardSet:
        """Check `root/index.json` against the files: sizes always, sha256 checksums when `verify`. `share`
        (i, n): hash every n-th file from the i-th only, for one of n processes that hash the rest between them
        (the ranks on a node, which read the same files)."""
        root = Path(root)
        index = root / INDEX
        if not index.is_file():
            raise FelixError(f"{root}: not a shard directory (no {INDEX})")
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FelixError(f"{index}: unreadable shard index ({exc})") from None
        if problem := _index_problem(meta):
            raise FelixError(f"{index}: malformed shard index: {problem}")
        version, splits = meta["format_version"], meta["splits"]
        if version > FORMAT_VERSION:
            raise FelixError(f"{index}: shard format {version} is newer than this felix reads ({FORMAT_VERSION})")
        itemsize = np.dtype(meta["dtype"]).itemsize
        listed = [(root / f["file"], f) for split in SPLITS for f in splits.get(split, {}).get("files", [])]
        for path, f in listed:  # every file's size first: a missing one is named before minutes of hashing
            if not path.is_file():
                raise FelixError(f"{path}: shard listed in {INDEX} is missing")
            size, expected = path.stat().st_size, f["n_tokens"] * itemsize
            if size != expected:
                what = "truncated shard" if size < expected else "shard longer than its index entry"
                raise FelixError(f"{path}: {what} ({size} bytes, {INDEX} says {expected})")
        if verify:
            i, n = share
            _verify_checksums([(path, f["sha256"]) for path, f in listed[i::n]], root / INDEX)
        return cls(root, meta)

    @property
    def tokenizer_sha256(self) -> str:
        """sha256 of the tokenizer.json these shards were written with."""
        return self.meta["tokenizer_sha256"]

    def _split(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise FelixError(f"{self.root}: no {split!r} split (have {sorted(self.meta['splits'])})")
        return self.meta["splits"][split]

    def n_tokens(self, split: str) -> int:
        """Tokens in `split`, document-end tokens included."""
        return self._split(split)["n_tokens"]

    def n_bytes(self, split: str) -> int:
        """UTF-8 bytes of the source text behind `split` (for bits per byte)."""
        return self._split(split)["n_bytes"]

    def n_documents(self, split: str) -> int:
        """Documents in `split`."""
        return self._split(split)["n_documents"]

    def tokens(self, split: str) -> list[np.ndarray]:
        """The split's token ids: one read-only memmap per shard file, in order (nothing read into RAM)."""
        return self.arrays(split)

    def files(self, split: str) -> list[Path]:
        """The non-empty shard files of `split`, in order: those `arrays` maps."""
        return [self.root / f["file"] for f in self._split(split)["files"] if f["n_tokens"]]

    def arrays(self, split: str) -> list[np.ndarray]:
        """One read-only memmap per shard file of `split` (same as `tokens`)."""
        dtype = np.dtype(self.meta["dtype"])
        files = self.files(split)
        _allow_open_files(len(files), self.root / INDEX)
        out = []
        for path in files:
            try:
                out.append(np.memmap(path, dtype=dtype, mode="r"))
            except OSError as exc:
                raise FelixError(f"{path}: cannot map shard ({exc.strerror or exc})") from None
        return out


def _open_files() -> int:
    """File descriptors this process has open (0 where the system does not list them)."""
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(fd_dir))
        except OSError:
            continue
    return 0


def _allow_open_files(n: int, index: Path) -> None:
    """Make room for `n` more open files. Each memmap holds a descriptor for as long as it lives, and a large
    split has thousands of shard files, past the usual soft limit of 1024 ("Too many open files"): raise the
    soft limit to the hard one, as systemd advises programs that need many descriptors to do."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = _open_files() + n
    if soft == resource.RLIM_INFINITY or need + FD_HEADROOM <= soft:
        return
    too_many = FelixError(f"{index}: mapping its {n} shard files needs {need} open files, more than this process "
                          f"may open ({soft}; hard limit {hard}); raise `ulimit -n`")
    unlimited = hard == resource.RLIM_INFINITY
    if not unlimited and need > hard:
        raise too_many
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need + FD_HEADROOM if unlimited else hard, hard))
    except (ValueError, OSError):  # macOS caps an unlimited hard limit lower (kern.maxfilesperproc)
        raise too_many from None
