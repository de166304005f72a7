"""Atomic file writes: write to a temp file beside the target, fsync, then rename.

mkstemp/mkdtemp make private files (0600) and directories (0700). A finished file gets the mode a plain
open() would have given it (0666/0777 less the umask), or keeps the mode of the file it replaces, so a
checkpoint or export is readable by whoever may read its directory (a server run as another user). A
replaced directory's mode carries over the same way (a user's 0700 export stays 0700), and so do the modes of
the entries a writer carries over into it (`atomic_dir`'s `keep`).

A directory cannot be renamed over a non-empty one, so `atomic_dir` first moves the old one aside to a
unique `.NAME.XXXXXXXX.old` (concurrent writers never share it) and deletes it once the new one is in.
A process killed between those two renames leaves the target missing and its old content aside: the
next `atomic_dir` of that target puts it back first (`restore_moved_aside`).

A temp's name says which process on which host writes it (`.NAME.HOST-PID.XXXXXXXX.tmp`): the next write of
that target deletes the temps of writers on this host that are gone (killed mid-write, they would otherwise
stay, as large as what they were writing), and leaves live writers' alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from felix.errors import FelixError

log = logging.getLogger(__name__)

# read once, at import: os.umask can only be read by setting it, which would race with other threads
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# an aside this old cannot belong to a commit in progress (its two renames are microseconds apart): it is
# a hard kill's leftover; a younger one is left to its writer
ASIDE_IN_FLIGHT_SECONDS = 10.0
# each attempt moves aside whatever another writer committed meanwhile; only a crowd of writers exhausts them
_COMMIT_ATTEMPTS = 8
# names this host in temp names (hashed: a hostname may hold dots or be long); pids are only checked here
_HOST = hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (True where that cannot be asked safely)."""
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def remove_stale_temps(target: str | os.PathLike) -> int:
    """Delete the temp files and directories of writes of `target` whose writer, on this host, is gone; how many."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{_HOST}-(\d+)\.[a-z0-9_]{{8}}\.tmp")
    removed = 0
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():
            if (m := pattern.fullmatch(p.name)) and not _alive(int(m.group(1))):
                _remove(p)
                removed += 1
    if removed:
        log.info("%s: removed %d temp(s) left by killed writers", target, removed)
    return removed


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
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
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
def atomic_dir(target: str | os.PathLike, keep: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success it replaces `target` whole (last writer wins).

    `keep`: names of entries the writer carried over from the old `target` (hard-linked or copied), read at
    the commit, so the writer may fill it inside the block. They and everything under them keep their own
    modes: a chmod of a hard link is a chmod of the user's file, and a 0600 file the user added stays 0600."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(target)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _plain_mode(target, directory=True))
        kept = {tmp / name for name in keep}
        for f in tmp.rglob("*"):
            if f.is_symlink():  # chmod and open would act on what it points to, outside the directory
                continue
            if kept.isdisjoint((f, *f.parents)):
                os.chmod(f, _new_mode(f.is_dir()))  # everything else in it is new
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            elif f.is_file():  # read-only: a kept file may be 0400, and stays so
                _fsync_readonly(f)
        _commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_readonly(path: Path) -> None:
    """fsync `path` through a read-only descriptor (POSIX allows it; Windows refuses, and it is skipped there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # a 0200 or 0000 file: no copy (a copy reads it), so a link to one already on disk
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def restore_moved_aside(target: str | os.PathLike, min_age: float | None = None) -> bool:
    """Put back the old content a writer killed mid-commit left aside when `target` is missing (True if
    it did); delete leftover asides of a target that exists (what they held was replaced since). Asides
    younger than `min_age` seconds (default ASIDE_IN_FLIGHT_SECONDS) may be a live commit's and are left
    alone; 0 when no writer can be live."""
    target, now = Path(target), time.time()
    min_age = ASIDE_IN_FLIGHT_SECONDS if min_age is None else min_age
    asides = [p for ctime, p in _asides(target) if now - ctime >= min_age]
    if asides and not os.path.lexists(target):
        with contextlib.suppress(OSError):  # another process restored or committed it meanwhile
            os.replace(asides[-1], target)  # the newest: the content the target had last
            log.warning("%s was missing after an interrupted write; restored its previous content", target)
            return True
    if os.path.lexists(target):
        for aside in asides:
            _remove(aside)
    return False


def _asides(target: Path) -> list[tuple[float, Path]]:
    """(rename time, path) of the moved-aside old contents of `target` (`.NAME.XXXXXXXX.old`), oldest first."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.old")
    found = []
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():
            if pattern.fullmatch(p.name):
                with contextlib.suppress(OSError):  # gone meanwhile
                    found.append((p.lstat().st_ctime, p))  # a rename sets ctime
    return sorted(found)


def _move_aside(target: Path) -> Path | None:
    """Rename `target` to a fresh unique `.NAME.XXXXXXXX.old` beside it; None if it is gone already."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        try:
            os.replace(target, aside)  # a directory renames over the empty placeholder
        except (IsADirectoryError, NotADirectoryError):  # a file or link cannot
            os.rmdir(aside)
            os.replace(target, aside)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.rmdir(aside)  # the placeholder, if still there (empty: nothing was renamed onto it)
        if isinstance(exc, FileNotFoundError):  # another writer moved it aside first
            return None
        raise
    return aside


def _commit_dir(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`, moving aside (then deleting) whatever is there, if need be repeatedly:
    a concurrent writer may commit between our two renames."""
    asides: list[Path] = []
    try:
        for _ in range(_COMMIT_ATTEMPTS):
            try:
                os.replace(tmp, target)  # replaces a missing target or an empty directory
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
            if (aside := _move_aside(target)) is not None:
                asides.append(aside)
        raise FelixError(f"{target}: other writers kept replacing it; gave up after {_COMMIT_ATTEMPTS} attempts")
    except BaseException:
        # failed or interrupted with the old content aside: put it back rather than leave no target, and
        # never delete it while there is none (earlier asides hold what later writers replaced)
        if asides and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.replace(asides.pop(), target)
        raise
    finally:
        for aside in asides:
            _remove(aside)


def _remove(path: Path) -> None:
    """Delete a directory tree, file or link, as far as possible."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def check_output(path: str | os.PathLike, what: str = "output", *, directory: bool | None, into: bool = False,
                 make_parents: bool = True) -> Path:
    """Fail fast, before the work, when output `path` could not be written: FelixError naming it and why.

    `directory`: the output is a directory (an existing non-directory is refused), a file (an existing
    directory is refused), or None (the caller judges what is there). A missing parent is fine when
    `make_parents` (the writer makes it), unless a file stands on the way. Writing is tried with a temp file
    where the writer creates its files: inside `path` when it is an existing directory written `into` (a run
    directory), else beside it (atomic writes rename into place), in the nearest directory that exists. So a
    read-only or pseudo file system (/proc) or a missing permission is named now, not after hours of work."""
    path = Path(path)
    found = _stat(path, what, path)
    if found is not None and directory is True and not stat.S_ISDIR(found.st_mode):
        raise FelixError(f"{what} {path}: exists and is not a directory")
    if found is not None and directory is False and stat.S_ISDIR(found.st_mode):
        raise FelixError(f"{what} {path}: is a directory; give a file name")
    if into and found is not None and stat.S_ISDIR(found.st_mode):
        holder = path
    else:
        for holder in (path.parent, *path.parent.parents):  # the nearest that exists
            if (found := _stat(holder, what, path)) is not None:
                break
        else:  # only when the working directory itself was deleted
            raise FelixError(f"{what} {path}: none of the directories on its path exists")
        if not stat.S_ISDIR(found.st_mode):
            what_it_is = f"the file {holder}" if stat.S_ISREG(found.st_mode) else f"{holder}, which is not a directory"
            raise FelixError(f"{what} {path}: lies under {what_it_is}")
        if holder != path.parent and not make_parents:
            raise FelixError(f"{what} {path}: directory {path.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".felix-write-check.", suffix=".tmp", dir=holder)
    except OSError as exc:
        raise FelixError(f"{what} {path}: cannot create files in {holder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _stat(p: Path, what: str, path: Path) -> os.stat_result | None:
    """os.stat of `p`, None when it does not exist (or a file on its path stops it from existing)."""
    try:
        return os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # EACCES on a directory above it, ELOOP, ...
        raise FelixError(f"{what} {path}: cannot look at {p} ({exc.strerror or exc})") from None


def check_apart(out: str | os.PathLike, source: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output at its own source, inside it (checkpoint directories are pruned and artifacts replaced
    whole, taking anything written there along), or holding it (a directory output is replaced whole)."""
    out_r, src = Path(out).resolve(), Path(source).resolve()
    if out_r == src or out_r in src.parents or src in out_r.parents:
        raise FelixError(f"{what} {out} would overwrite or sit inside the checkpoint it is made from ({source})")
