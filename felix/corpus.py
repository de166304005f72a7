"""Text sources: the demo's corpus built from what every machine has, and reading documents with
errors that name the file and line."""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import platform
import random
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from felix.atomic import atomic_dir, check_output
from felix.chat import ChatDocument, ChatFormatError, chat_turns
from felix.errors import FelixError
from felix.facts import fact_documents, stdlib_facts
from felix.jsonl import json_objects, text_lines

TASKS_DIR = Path(__file__).parent / "data" / "tasks"
# Shares of the byte budget when `max_bytes` caps the corpus.
SOURCE_SHARES = {"code": 0.55, "docs": 0.35, "tasks": 0.10}
MANIFEST = "corpus.json"  # the parameters a corpus directory was built with, so reuse is never stale
CORPUS_FILES = {MANIFEST, "code.jsonl", "docs.jsonl", "tasks.jsonl", "facts.jsonl"}
TXT_SEPARATOR = "<|endoftext|>"  # a line holding only this ends a document in .txt sources
TXT_MAX_DOCUMENT_CHARS = 1 << 24  # a longer run of .txt lines without a separator is cut at a line end
# How each documented source suffix is read (matched in any case).
SOURCE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}


def stdlib_files(seed: int = 0) -> list[Path]:
    """The standard library's own .py files (no site-packages), in a seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    return files


def _read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a handful of stdlib test files are deliberately not UTF-8
    return text if text.strip() else None


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= 40:
            title = f"{type(node).__name__.removesuffix('Def').lower()} {getattr(node, 'name', '')}".strip()
            out.append(f"{title}\n\n{doc}")
    return out


def task_documents(tasks_dir: Path = TASKS_DIR) -> list[str]:
    """The shipped task-suite dev records as documents: each input followed by its reference answer.
    The test set is never pretraining text: evaluation on it must stay clean."""
    docs = []
    for path in sorted(tasks_dir.glob("*.jsonl")) if tasks_dir.is_dir() else []:
        if path.stem == "test":
            continue
        for _, record in json_records(path):
            # the material and its gold answer; ground-truth bookkeeping fields are not text to learn
            parts = [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for k, v in record.items() if k in ("input", "reference")]
            text = "\n\n".join(p for p in parts if p.strip())
            if text:
                docs.append(text)
    return docs


class _Budgeted:
    """JSONL lines of one source, taken while they fit its byte budget (None: no cap). The budget bounds
    the file's size on disk; a document that does not fit is skipped, as a smaller one may still fit."""

    def __init__(self, budget: int | None):
        self.budget, self.lines, self.used = budget, [], 0

    def offer(self, text: str) -> None:
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        size = len(line.encode("utf-8"))
        if self.budget is None or self.used + size <= self.budget:
            self.lines.append(line)
            self.used += size

    @property
    def full(self) -> bool:
        # within 2% of the cap: scanning on for documents small enough to fill the rest is not worth it
        return self.budget is not None and self.used >= 0.98 * self.budget


def _reusable(out_dir: Path, manifest: dict) -> bool:
    """Whether `out_dir` already holds this very corpus; refuses to replace a directory that is not a corpus
    (a file there was refused by `check_output`)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return False
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in CORPUS_FILES)
    if foreign:
        raise FelixError(f"{out_dir}: exists and holds files that are not a corpus ({', '.join(foreign[:3])}); "
                         f"refusing to replace it")
    try:
        found = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict) or not isinstance(found.get("files"), list):
        return False  # a damaged or foreign manifest: rebuild
    return found.get("params") == manifest["params"] and all(
        isinstance(n, str) and (out_dir / n).is_file() for n in found["files"])


def build_stdlib_corpus(out_dir: Path, max_bytes: int | None = None, seed: int = 0,
                        facts: bool = False) -> dict[str, Path]:
    """JSONL sources from the Python standard library (`code`: its .py files, `docs`: their docstrings) and
    the shipped task samples (`tasks`, when present), capped at `max_bytes` in all, split by SOURCE_SHARES.
    With `facts`, also `facts`: statements of the standard library's tables (`felix.facts`, about 80 KB,
    outside the cap).

    Deterministic for a seed and Python version. A directory holding the same corpus (same parameters, per
    its corpus.json) is reused; one built with other parameters is rebuilt whole.
    """
    out_dir = Path(out_dir)
    if max_bytes is not None and max_bytes <= 0:
        raise FelixError(f"max_bytes must be positive, got {max_bytes}")
    check_output(out_dir, directory=True)  # before reading the standard library
    tasks = task_documents()
    names = ["code", "docs"] + (["tasks"] if tasks else []) + (["facts"] if facts else [])
    params = {"max_bytes": max_bytes, "seed": seed, "python": platform.python_version(),
              "tasks_sha256": hashlib.sha256("\0".join(tasks).encode("utf-8")).hexdigest()}
    if facts:  # the key only when asked, so a corpus built before the option is still reused
        params["facts"] = True
    manifest = {"params": params, "files": [f"{n}.jsonl" for n in names]}
    if _reusable(out_dir, manifest):
        return {n: out_dir / f"{n}.jsonl" for n in names}
    capped = [n for n in names if n in SOURCE_SHARES]
    total = sum(SOURCE_SHARES[n] for n in capped)
    src = {n: _Budgeted(None if max_bytes is None else int(max_bytes * SOURCE_SHARES[n] / total)) for n in capped}
    for path in stdlib_files(seed):
        if src["code"].full and src["docs"].full:
            break
        text = _read_source(path)
        if text is None:
            continue
        if not src["code"].full:
            src["code"].offer(text)
        if not src["docs"].full:
            for doc in _docstrings(text):
                src["docs"].offer(doc)
    for doc in tasks:
        src["tasks"].offer(doc)
    if facts:
        src["facts"] = _Budgeted(None)
        for doc in fact_documents(stdlib_facts(), seed=seed):
            src["facts"].offer(doc)
    if empty := [n for n in names if not src[n].lines]:
        raise FelixError(f"{out_dir}: max_bytes={max_bytes} leaves no room for one document of {empty}")
    with atomic_dir(out_dir) as tmp:
        for n in names:
            (tmp / f"{n}.jsonl").write_text("".join(src[n].lines), encoding="utf-8")
        sizes = {n: src[n].used for n in names}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "bytes": sizes}, indent=1), encoding="utf-8")
    return {n: out_dir / f"{n}.jsonl" for n in names}


def _line_of(path: Path) -> Callable[[int], str]:
    """How errors name a line of a source file (`path: line n`), the same for .jsonl and .txt sources."""
    return lambda n: f"{path}: line {n}"


def json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file, streamed; errors name file and line
    (a key given twice included)."""
    return json_objects(path, _line_of(path))


def surrogate_problem(text: str) -> str | None:
    """Why `text` cannot be UTF-8 (a lone surrogate, from a JSON "\\ud800" escape or undecodable
    command-line bytes), or None. The tokenizer's Rust side refuses such text with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{exc.object[exc.start:exc.end]!r} at character {exc.start} is a lone surrogate, not valid Unicode"
    return None


def source_kind(path: str | Path) -> str:
    """"jsonl" or "txt": how a source file is read, by its suffix (any case); another suffix is an error, as
    reading a .json or .csv file as plain text would train on its syntax without a word."""
    path = Path(path)
    kind = SOURCE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise FelixError(f"{path}: unknown source suffix {path.suffix or '(none)'!r}; sources are "
                         f"{', '.join(SOURCE_SUFFIXES)} files (.jsonl and .ndjson: one JSON object per line; "
                         f".txt: plain text)")
    return kind


def check_source(path: str | Path) -> None:
    """FelixError unless `path` is a file with a source suffix, naming a symlink loop, a dangling link or a
    directory as such: checked up front, not after hours of work on the sources before it."""
    path = Path(path)
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FelixError(f"{path}: a symlink loop (cannot be resolved to a file)") from None
        if exc.errno == errno.ENOENT:
            dangling = " (a dangling symlink)" if path.is_symlink() else ""
            raise FelixError(f"{path}: no such file{dangling}") from None
        raise FelixError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not path.is_file():
        raise FelixError(f"{path}: " + ("is a directory, not a source file" if path.is_dir() else "not a file"))
    source_kind(path)


def _chat_document(path: Path, lineno: int, record: dict) -> ChatDocument:
    """A chat-format record (`felix harvest export`) as one document in the chat template."""
    try:
        turns = chat_turns(record["messages"])
    except ChatFormatError as exc:
        raise FelixError(f"{path}: line {lineno}: field \"messages\": {exc}") from None
    for i, (_, text) in enumerate(turns):
        if problem := surrogate_problem(text):
            raise FelixError(f"{path}: line {lineno}: field \"messages\": messages[{i}].content: {problem}")
    return ChatDocument(turns)


def _jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, record in json_records(path):
        has_text, has_chat = "text" in record, "messages" in record
        if has_text and has_chat:
            raise FelixError(f"{path}: line {lineno}: both \"text\" and \"messages\"; a record is one or the "
                             f"other")
        if has_chat:
            yield _chat_document(path, lineno, record)
            continue
        text = record.get("text")
        if not isinstance(text, str):
            raise FelixError(f"{path}: line {lineno}: expected an object with a string \"text\" field or a chat's "
                             f"\"messages\" list" + (f" (\"text\" is {type(text).__name__})" if has_text else ""))
        if problem := surrogate_problem(text):  # a JSON "\ud800" escape: valid JSON, not valid text
            raise FelixError(f"{path}: line {lineno}: {problem}")
        yield text


def _txt_documents(path: Path) -> Iterator[str]:
    doc: list[str] = []
    size, warned = 0, False
    for lineno, line in text_lines(path, _line_of(path)):
        if line.endswith("\r\n"):  # Windows line ends read as Python's text mode reads them
            line = line[:-2] + "\n"
        if line.rstrip("\r\n") == TXT_SEPARATOR:
            yield "".join(doc).removesuffix("\n")  # that newline ends the separator's line, not the text
            doc, size = [], 0
            continue
        doc.append(line)
        size += len(line)
        if size >= TXT_MAX_DOCUMENT_CHARS:  # else a separator-less file is one document, ~3x its size in memory
            if not warned:
                warnings.warn(f"{path}: line {lineno}: {size:,} characters without a {TXT_SEPARATOR} line; cut into "
                              f"documents of about {TXT_MAX_DOCUMENT_CHARS:,} characters at line ends (put "
                              f"{TXT_SEPARATOR} lines between the file's documents to choose where)", stacklevel=2)
                warned = True
            yield "".join(doc)
            doc, size = [], 0
    yield "".join(doc)


def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents of a source file, streamed; its suffix (any case) says how to read it. `.jsonl`/`.ndjson`:
    one object per line (blank lines skipped), either {"text": ...} or a chat {"messages": [...]} (as
    `felix harvest export` writes), which becomes a `ChatDocument` in the chat template. `.txt`: plain text
    (CRLF read as LF) whose documents are separated by lines holding only `<|endoftext|>`; a file without such
    lines is one document, cut at line ends into documents of about `TXT_MAX_DOCUMENT_CHARS` (with a warning)
    when longer. A leading byte order mark is dropped; documents of only whitespace are
    skipped. Errors name the file and line: an unknown suffix, non-UTF-8 bytes or lone surrogates, invalid
    JSON, a record without "text" or "messages", or with both, a malformed messages list, a file with no
    document."""
    path = Path(path)
    kind = source_kind(path)
    found = skipped = False
    for doc in (_jsonl_documents if kind == "jsonl" else _txt_documents)(path):
        if doc.strip() or isinstance(doc, ChatDocument):
            found = True
            yield doc
        else:
            skipped = True
    if not found:
        raise FelixError(f"{path}: " + ("no documents (every \"text\" is empty or whitespace)" if skipped and
                                        kind == "jsonl" else "file is empty (no documents)"))
