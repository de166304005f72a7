"""One process at a time per run directory: an exclusive advisory lock (flock) on `DIR/.lock`, taken before the
directory is touched and held while the run lasts. A second `felix train` (or `felix demo`) into the same directory
is refused, naming the holder's pid and host, which the holder writes into the lock file. The kernel releases a
flock when its holder dies, however it dies, so a SIGKILLed run leaves no stale lock; the file itself stays.

The patch stack beside a checkpoint is held the same way (`felix.patches.lock_stack`, `splices/.lock`): by
`felix serve` for its life, by `felix splice apply`/`rollback` while they run, and by `felix quantize` while it
replaces an artifact (so not under a server).

Within one process the lock is shared: a second Trainer on the directory (a test, a notebook cell run again while
the first object lives) holds it too, and it is let go when the last holder releases it or is collected.
Imports no torch."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from felix.atomic import check_output
from felix.errors import FelixError

LOCK_FILE = ".lock"


@dataclass
class _Held:
    fd: int
    holders: int


_HELD: dict[str, _Held] = {}  # by the directory's real path
_GUARD = threading.RLock()  # re-entrant: a RunLock's __del__ may run (gc) while this thread holds it


class RunLock:
    """One hold on a run directory's lock; `release` (or garbage collection) lets go of it."""

    def __init__(self, key: str | None):
        self._key = key  # None: nothing held (no flock on this platform or filesystem)

    def release(self) -> None:
        """Let go of this hold (again: nothing); the flock goes with the process's last hold."""
        key, self._key = self._key, None
        if key is None:
            return
        with _GUARD:
            held = _HELD[key]
            held.holders -= 1
            if held.holders == 0:
                del _HELD[key]
                os.close(held.fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the registry may be gone; the kernel frees it
            self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the file ("pid P on HOST", after its label if it gave
    one: "felix serve, pid P on HOST")."""
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", errors="replace").strip().split(maxsplit=2)
    except OSError:
        text = []
    if len(text) >= 2 and text[0].isdigit():
        return f"{text[2] + ', ' if len(text) > 2 else ''}pid {text[0]} on {text[1]}"
    return "pid unknown: it is just starting"  # it holds the lock and has not written its pid yet


def lock_run_dir(directory: Path, retry_hint: str = "wait for it to finish, or choose another --out", *,
                 label: str = "", what: str = "another felix run is using this directory") -> RunLock:
    """Take `directory`'s lock (making the directory), or raise FelixError naming the process that holds it (or
    what makes `directory` unwritable): "DIRECTORY: `what` (HOLDER, per LOCKFILE); `retry_hint`". `label`
    (one line) says what this process is, for the message another one gets."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock; the project is Linux/macOS-first and runs there go unguarded
        return RunLock(None)
    directory = Path(directory)
    check_output(directory, directory=True, into=True)  # a file there or on its path: named, not a traceback
    directory.mkdir(parents=True, exist_ok=True)
    key, path = os.path.realpath(directory), directory / LOCK_FILE
    with _GUARD:
        if (held := _HELD.get(key)) is not None:
            held.holders += 1
            return RunLock(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: it names the holder, if any
        except OSError as exc:
            raise FelixError(f"{path}: cannot open the run directory's lock ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FelixError(f"{directory}: {what} ({holder}, per {path}); {retry_hint}") from None
        except OSError as exc:  # a filesystem without flock: refusing to train there would be worse
            os.close(fd)
            warnings.warn(f"{path}: cannot lock the run directory ({exc.strerror or exc}); a second run into "
                          f"it would not be stopped", stacklevel=2)
            return RunLock(None)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {' '.join(label.split())}".strip().encode() + b"\n", 0)
        except OSError as exc:  # a full disk: let go, or this process would later be refused by itself
            os.close(fd)
            raise FelixError(f"{path}: cannot write the lock's holder ({exc.strerror or exc})") from None
        _HELD[key] = _Held(fd, 1)
    return RunLock(key)
