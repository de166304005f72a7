"""Text sources: the demo's corpus built from what every machine has, and reading documents with
errors that name the file and line."""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from felix.atomic import atomic_dir
from felix.errors import FelixError

TASKS_DIR = Path(__file__).parent / "data" / "tasks"
# Shares of the byte budget when `max_bytes` caps the corpus.
SOURCE_SHARES = {"code": 0.55, "docs": 0.35, "tasks": 0.10}


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


def task_documents() -> list[str]:
    """The shipped task-suite records as documents: each input followed by its reference answer."""
    docs = []
    for path in sorted(TASKS_DIR.glob("*.jsonl")) if TASKS_DIR.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            # the material and its gold answer; ground-truth bookkeeping fields are not text to learn
            parts = [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for k, v in record.items() if k in ("input", "reference")]
            text = "\n\n".join(p for p in parts if p.strip())
            if text:
                docs.append(text)
    return docs


def _write_jsonl(path: Path, docs: list[str], budget: int | None) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            size = len(line.encode("utf-8"))  # the budget bounds the files' size on disk
            if budget is not None and n + size > budget:
                continue  # a smaller document further on may still fit
            f.write(line)
            n += size
    return n


def build_stdlib_corpus(out_dir: Path, max_bytes: int | None = None, seed: int = 0) -> dict[str, Path]:
    """JSONL sources from the Python standard library (`code`, `docs`) and the shipped task samples
    (`tasks`, when present). Reuses `out_dir` when it is already complete."""
    out_dir = Path(out_dir)
    names = ["code", "docs"] + (["tasks"] if task_documents() else [])
    if all((out_dir / f"{n}.jsonl").is_file() for n in names):
        return {n: out_dir / f"{n}.jsonl" for n in names}
    total = sum(SOURCE_SHARES[n] for n in names)
    budget = {n: None if max_bytes is None else int(max_bytes * SOURCE_SHARES[n] / total) for n in names}
    code, docs = [], []
    code_bytes = doc_bytes = 0
    for path in stdlib_files(seed):
        text = _read_source(path)
        if text is None:
            continue
        if budget["code"] is None or code_bytes < budget["code"]:
            code.append(text)
            code_bytes += len(text.encode("utf-8"))
        if budget["docs"] is None or doc_bytes < budget["docs"]:
            found = _docstrings(text)
            docs.extend(found)
            doc_bytes += sum(len(d.encode("utf-8")) for d in found)
        if max_bytes is not None and code_bytes >= budget["code"] and doc_bytes >= budget["docs"]:
            break
    with atomic_dir(out_dir) as tmp:
        _write_jsonl(tmp / "code.jsonl", code, budget["code"])
        _write_jsonl(tmp / "docs.jsonl", docs, budget["docs"])
        if "tasks" in names:
            _write_jsonl(tmp / "tasks.jsonl", task_documents(), budget["tasks"])
    return {n: out_dir / f"{n}.jsonl" for n in names}


def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents of a source file: `.jsonl` with a "text" field per line, or a `.txt` file whose
    documents are separated by lines holding only `<|endoftext|>` (a whole file is one document)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FelixError(f"{path}: cannot read ({exc.strerror})") from None
    if not raw.strip():
        raise FelixError(f"{path}: file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FelixError(f"{path}: line {line}: not valid UTF-8 (byte {exc.start})") from None
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FelixError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise FelixError(f"{path}: line {lineno}: expected an object with a string \"text\" field")
            if record["text"]:
                yield record["text"]
    else:
        for doc in text.split("\n<|endoftext|>\n"):
            if doc.strip():
                yield doc
