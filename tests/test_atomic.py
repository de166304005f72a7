"""Atomic writes: a finished file or directory has the mode a plain create would give it."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from felix import atomic
from felix.atomic import atomic_dir, atomic_path, atomic_write_text


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
