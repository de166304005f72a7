"""Atomic file writes: write to a temp file beside the target, fsync, then rename.

mkstemp/mkdtemp make private files (0600) and directories (0700). A finished file gets the mode a plain
open() would have given it (0666/0777 less the umask), or keeps the mode of the file it replaces, so a
checkpoint or export is readable by whoever may read its directory (a server run as another user).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from felix.errors import FelixError

# read once, at import: os.umask can only be read by setting it, which would race with other threads
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _new_mode(directory: bool) -> int:
    """The mode a plain create gives a new file or directory."""
    return (0o777 if directory else 0o666) & ~_UMASK


def _plain_mode(target: Path, directory: bool) -> int:
    """The mode `target` has (it exists and is replaced) or a plain create would give it."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return _new_mode(directory)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's directory; on success rename it over the target."""
    target = Path(target)
    if not target.parent.exists():
        raise FileNotFoundError(f"directory does not exist: {target.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # after the caller's write: some writers (safetensors) replace the file with a 0600 one
        os.chmod(tmp_path, _plain_mode(target, directory=False))
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success it replaces `target` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _plain_mode(target, directory=True))
        for f in tmp.rglob("*"):
            os.chmod(f, _new_mode(f.is_dir()))  # everything in it is new
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_apart(out: str | os.PathLike, source: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output at its own source, inside it (checkpoint directories are pruned and artifacts replaced
    whole, taking anything written there along), or holding it (a directory output is replaced whole)."""
    out_r, src = Path(out).resolve(), Path(source).resolve()
    if out_r == src or out_r in src.parents or src in out_r.parents:
        raise FelixError(f"{what} {out} would overwrite or sit inside the checkpoint it is made from ({source})")
