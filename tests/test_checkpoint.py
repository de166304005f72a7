"""Checkpoints: atomic step directories, pruning, exact optimizer/RNG round trip, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import felix.checkpoint as ckpt_module
from felix.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    remove_partial_checkpoints,
    restore_training_state,
    save_checkpoint,
)
from felix.config import config_from_dict
from felix.errors import FelixError
from felix.model import FelixLM
from felix.optim import build_optimizer

RAW = {"model": {"vocab_size": 128, "n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 16,
                 "splice_every": 1, "splice_rank": 2},
       "train": {"seq_len": 16, "lr": 1e-2, "warmup_steps": 0}}


def trained(steps: int = 3):
    cfg = config_from_dict(RAW)
    torch.manual_seed(0)
    model = FelixLM(cfg.model)
    opt = build_optimizer(model, cfg.train)
    for _ in range(steps):
        x = torch.randint(0, 128, (2, 16))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return cfg, model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    cfg, model, opt = trained()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 3, model, cfg, {"step": 3}, opt)
    expected_draw = torch.rand(4)
    ckpt = load_checkpoint(path)
    assert ckpt.config == cfg and ckpt.trainer_state == {"step": 3}
    fresh = FelixLM(cfg.model)
    fresh_opt = build_optimizer(fresh, cfg.train)
    load_model_weights(fresh, ckpt)
    restore_training_state(path, fresh, fresh_opt)
    assert torch.equal(torch.rand(4), expected_draw)
    for (_, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b)
    # one more identical step from both gives identical weights: the AdamW moments came back exactly
    x = torch.randint(0, 128, (2, 16))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).logsumexp(-1).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_keep_last_prunes_oldest(tmp_path):
    cfg, model, opt = trained(1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, cfg, {}, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_prune_killed_midway_leaves_no_torn_checkpoint(tmp_path, monkeypatch):
    """A kill while an old checkpoint is deleted must not leave a `step-N` that lists as complete."""
    cfg, model, opt = trained(1)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, cfg, {}, opt, keep_last=2)
    real_rmtree = ckpt_module.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        victim = Path(path) / "optimizer.safetensors"
        if victim.exists():  # delete one file, then die as SIGKILL would
            victim.unlink()
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt_module.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, cfg, {}, opt, keep_last=2)
    monkeypatch.setattr(ckpt_module.shutil, "rmtree", real_rmtree)
    for ckpt in list_checkpoints(tmp_path):
        assert (ckpt / "optimizer.safetensors").is_file(), ckpt
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_a_checkpoint_left_moved_aside_by_a_kill_is_put_back(tmp_path):
    # What a kill between atomic_dir's two renames leaves when a step is saved again (after a rollback):
    # the old step directory moved aside, the new one still a temp directory.
    cfg, model, _ = trained(0)
    saved = save_checkpoint(tmp_path, 2, model, cfg, {})
    root = saved.parent
    saved.rename(root / ".step-00000002.k1ll3d_x.old")
    (root / ".step-00000002.abcd1234.tmp").mkdir()
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert latest_checkpoint(tmp_path) == saved and (saved / "model.safetensors").is_file()


def test_mismatched_config_names_the_checkpoint(tmp_path):
    cfg, model, _ = trained(0)
    path = save_checkpoint(tmp_path, 1, model, cfg, {})
    other = config_from_dict(RAW | {"model": RAW["model"] | {"d_ff": 96}})
    with pytest.raises(FelixError, match="step-00000001.*shape mismatch"):
        load_model_weights(FelixLM(other.model), load_checkpoint(path))


def test_corrupted_weights_are_a_clear_error(tmp_path):
    cfg, model, _ = trained(0)
    path = save_checkpoint(tmp_path, 1, model, cfg, {})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FelixError, match="model.safetensors"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FelixError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "nothing-here")


@pytest.mark.parametrize(("name", "what"), [("optimizer.safetensors", "optimizer state"),
                                            ("rng.safetensors", "RNG state")])
def test_damaged_training_state_names_the_file(tmp_path, name, what):
    cfg, model, opt = trained()
    path = save_checkpoint(tmp_path, 1, model, cfg, {}, opt)
    (path / name).write_bytes((path / name).read_bytes()[:100])
    with pytest.raises(FelixError, match=f"{name}: unreadable {what}"):
        restore_training_state(path, model, opt)
    (path / name).unlink()
    with pytest.raises(FelixError, match=f"{name}: unreadable {what}"):
        restore_training_state(path, model, opt)


def test_newer_format_and_non_object_metadata_are_clear_errors(tmp_path):
    cfg, model, _ = trained(0)
    path = save_checkpoint(tmp_path, 1, model, cfg, {})
    meta = path / "trainer.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps(doc | {"format_version": 2}))
    with pytest.raises(FelixError, match="trainer.json: checkpoint format 2 is newer"):
        load_checkpoint(path)
    meta.write_text("[1, 2]")
    with pytest.raises(FelixError, match="trainer.json: unreadable checkpoint metadata"):
        load_checkpoint(path)


def test_optimizer_state_of_another_model_is_refused(tmp_path):
    """Moments shaped for another model: the fused AdamW step would use them without a shape check."""
    cfg, model, opt = trained()
    path = save_checkpoint(tmp_path / "a", 3, model, cfg, {}, opt)
    other = config_from_dict(RAW | {"model": RAW["model"] | {"d_ff": 96}})
    torch.manual_seed(0)
    wide = FelixLM(other.model)
    wide_opt = build_optimizer(wide, other.train)
    wide(torch.randint(0, 128, (2, 16))).logsumexp(-1).mean().backward()
    wide_opt.step()
    foreign = save_checkpoint(tmp_path / "b", 1, wide, other, {}, wide_opt)
    shutil.copyfile(foreign / "optimizer.safetensors", path / "optimizer.safetensors")
    fresh = FelixLM(cfg.model)
    fresh_opt = build_optimizer(fresh, cfg.train)
    with pytest.raises(FelixError, match="optimizer.safetensors: optimizer state does not fit.*mlp"):
        restore_training_state(path, fresh, fresh_opt)
    assert not fresh_opt.state  # nothing half-loaded
