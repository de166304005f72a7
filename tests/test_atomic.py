"""Atomic writes: a finished file or directory has the mode a plain create would give it; killed writers' leftovers are
cleaned up by the next write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from felix import atomic
from felix.atomic import atomic_dir, atomic_path, atomic_write_text, remove_stale_temps


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_new_files_and_directories_follow_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(atomic, "_UMASK", umask)
    atomic_write_text(tmp_path / "report.json", "{}")
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors itself writes 0600 files
    with atomic_dir(tmp_path / "export") as d:
        (d / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(d / "sub" / "model.safetensors"))
        (d / "config.json").write_text("{}")
    for f in ("report.json", "model.safetensors", "export/sub/model.safetensors", "export/config.json"):
        assert _mode(tmp_path / f) == 0o666 & ~umask, f
    assert _mode(tmp_path / "export") == _mode(tmp_path / "export" / "sub") == 0o777 & ~umask


def test_a_replaced_file_keeps_its_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    target = tmp_path / "token"
    target.write_text("old")
    os.chmod(target, 0o600)  # a user's private file stays private when rewritten
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o600


def test_a_replaced_directory_and_the_entries_carried_into_it_keep_their_modes(tmp_path, monkeypatch):
    """Before: a file hard-linked from the old directory was chmodded to 0644, and with it the user's file."""
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    target = tmp_path / "export"
    _write_dir(target, "old")
    (target / "token").write_text("secret")
    (target / "eval").mkdir()
    (target / "eval" / "scores.json").write_text("{}")
    (target / "license").write_text("mit")
    for name, mode in {"token": 0o600, "eval": 0o700, "eval/scores.json": 0o640, "license": 0o444, ".": 0o700}.items():
        os.chmod(target / name, mode)
    users_token = os.stat(target / "token")
    kept: list[str] = []
    with atomic_dir(target, keep=kept) as d:
        kept += ["token", "eval", "license"]  # filled inside the block: read at the commit
        os.link(target / "token", d / "token")
        (d / "eval").mkdir(mode=0o700)
        os.link(target / "eval" / "scores.json", d / "eval" / "scores.json")
        (d / "license").write_text("mit")
        os.chmod(d / "license", 0o444)
        (d / "who").write_text("new")
    assert os.stat(target / "token").st_ino == users_token.st_ino
    assert {name: _mode(target / name) for name in ("token", "eval", "eval/scores.json", "license", "who", ".")} == {
        "token": 0o600, "eval": 0o700, "eval/scores.json": 0o640, "license": 0o444, "who": 0o644, ".": 0o700}


def test_a_kept_file_its_owner_cannot_read_is_kept_as_it_is(tmp_path, monkeypatch):
    """Before: the commit's fsync opened every kept file for reading, and a hard-linked 0200 file of the user's
    failed the whole write with a PermissionError (chmodded to 0644 the day before, it passed). Root reads any
    file, so under root the refusal a user gets is made here."""
    target = tmp_path / "export"
    _write_dir(target, "old")
    (target / "drop").write_text("write-only")
    os.chmod(target / "drop", 0o200)
    if os.geteuid() == 0:
        real_open = os.open

        def user_open(path, flags, *args, **kwargs):
            if Path(path).name == "drop" and not os.stat(path).st_mode & 0o444:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", user_open)
    with atomic_dir(target, keep=["drop"]) as d:
        os.link(target / "drop", d / "drop")
        (d / "new").write_text("new")
    assert _mode(target / "drop") == 0o200 and (target / "new").read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_process_umask_is_read_at_import():
    current = os.umask(0o022)
    os.umask(current)
    assert current == atomic._UMASK


def _replace_with_hook(monkeypatch, hook):
    """os.replace that calls `hook(src, dst)` after each real rename: another writer's or a crash's timing."""
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        hook(Path(src), Path(dst))

    monkeypatch.setattr(os, "replace", replace)


def _write_dir(target, text: str) -> None:
    with atomic_dir(target) as d:
        (d / "who").write_text(text)


def test_a_writer_committing_between_anothers_two_renames_is_no_error(tmp_path, monkeypatch):
    """A moves the old directory aside; B commits before A's own rename: A still succeeds, last writer wins."""
    target = tmp_path / "out"
    _write_dir(target, "old")
    fired = []

    def concurrent_writer(src, dst):
        if src == target and not fired:  # right after A's move-aside
            fired.append(True)
            _write_dir(target, "B")

    _replace_with_hook(monkeypatch, concurrent_writer)
    _write_dir(target, "A")
    assert fired and (target / "who").read_text() == "A"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing moved aside is left


def test_an_interrupted_commit_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write_dir(target, "old")
    real, moved = os.replace, []

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        if dst == target and moved and src != moved[-1]:
            raise KeyboardInterrupt  # after the old directory went aside, before the new one is renamed in
        real(src, dst)
        if src == target:
            moved.append(dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write_dir(target, "new")
    assert moved and (target / "who").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_MID_COMMIT = """
import os, sys
from pathlib import Path
from felix.atomic import atomic_dir
target, real = Path(sys.argv[1]), os.replace
def replace(src, dst):
    real(src, dst)
    if Path(src) == target:
        os._exit(9)  # killed between moving the old directory aside and renaming the new one in
os.replace = replace
with atomic_dir(target) as d:
    (d / "who").write_text("new")
"""


def test_the_next_write_restores_what_a_killed_writer_moved_aside(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write_dir(target, "old")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_COMMIT)
    assert subprocess.run([sys.executable, str(script), str(target)], timeout=60).returncode == 9
    assert not target.exists()
    (aside,) = tmp_path.glob(".out.*old")
    assert (aside / "who").read_text() == "old"  # the old content survives the kill, aside
    # it went aside a moment ago: count it as old, as after a restart it would be
    monkeypatch.setattr(atomic, "ASIDE_IN_FLIGHT_SECONDS", -1.0)
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("this writer fails too")
    assert (target / "who").read_text() == "old" and not list(tmp_path.glob(".out.*old"))


def test_a_fresh_aside_is_left_to_its_writer_and_a_stale_one_deleted(tmp_path, monkeypatch):
    """Beside a missing target, a just-moved aside may be a commit in progress: neither restored nor
    deleted; an old one beside a target that exists holds replaced content and goes."""
    target = tmp_path / "out"
    aside = tmp_path / ".out.abcd1234.old"
    aside.mkdir()
    _write_dir(target, "new")
    assert aside.is_dir() and (target / "who").read_text() == "new"
    monkeypatch.setattr(atomic, "ASIDE_IN_FLIGHT_SECONDS", -1.0)
    _write_dir(target, "newer")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "who").read_text() == "newer"


WRITER = """
import sys, time
from pathlib import Path
from felix.atomic import atomic_dir, atomic_path
target = Path(sys.argv[1])
with (atomic_dir if sys.argv[2] == "dir" else atomic_path)(target) as tmp:
    (tmp / "weights" if sys.argv[2] == "dir" else tmp).write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_the_next_write_deletes_a_killed_writers_temp_and_keeps_a_live_ones(tmp_path, kind):
    """Before: a writer killed mid-write left its temp (as large as the file it wrote) for good."""
    target = tmp_path / "export"

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "writing\n"
        return proc

    def temps() -> set[str]:
        return {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")}

    killed = start()
    killed_temps = temps()
    killed.kill()
    killed.wait()
    live = start()
    try:
        live_temps = temps() - killed_temps
        assert len(killed_temps) == 1 and len(live_temps) == 1
        with atomic_dir(target) if kind == "dir" else atomic_path(target) as tmp:
            (tmp / "weights" if kind == "dir" else tmp).write_bytes(b"new")
        assert temps() == live_temps  # the killed writer's is gone, the live writer's untouched
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(target) == 1 and temps() == set()
