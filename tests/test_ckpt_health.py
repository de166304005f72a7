"""Checkpoints of long runs: written only once the run is healthy, the last good one kept as the rollback target
whatever keep_last says, rollbacks counted per divergence episode, milestones (keep_every) never pruned, a full
disk named with what a checkpoint needs, a damaged newest checkpoint set aside for the one before it, and a
checkpoint with splice patches spared by a rollback."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from test_trainer import losses, write_config

from felix.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint
from felix.cli import main
from felix.config import load_config
from felix.errors import FelixError
from felix.train_control import stop_message
from felix.trainer import Trainer

EVERY_STEP = 1e-6  # train.ckpt_every_minutes: a timed checkpoint at every step


def _steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(run)]


def _poison(trainer: Trainer) -> torch.utils.hooks.RemovableHandle:
    """Every forward NaN from now on (until the handle is removed): bad steps that no checkpoint cures."""
    return trainer.model.tok_emb.register_forward_hook(lambda mod, inp, out: out * float("nan"))


def _same_weights(model: torch.nn.Module, ckpt: Path) -> bool:
    saved = load_checkpoint(ckpt).model_state
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_diverging_run_keeps_its_last_good_checkpoint_and_a_lower_lr_resumes_from_it(tmp_path, tiny_mix):
    """The reviewer's run: resumed with lr 0.5 it diverges one or two good steps after each rollback. Checkpoints
    saved after those steps became the next rollback targets (each resetting max_rollbacks) and pushed the last
    good one out of keep_last, so a resume with a sane lr started from diverged weights."""
    run = tmp_path / "run"
    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=20, ckpt_every=5, eval_every=0)), run,
            progress=False).run()
    assert _steps(run) == [15, 20]
    hot = load_config(write_config(tmp_path, tiny_mix, max_steps=60, ckpt_every=5, eval_every=0, lr=0.5))
    with pytest.warns(UserWarning, match="schedule differs"):
        trainer = Trainer(hot, run, resume=True, progress=False)
    with pytest.raises(FelixError, match=r"keeps failing after 3 rollback\(s\) to \S*step-00000020 .*Lower train\.lr"):
        trainer.run()
    assert trainer.state.rollbacks == 3  # one episode: no checkpoint written in it resets the count
    assert _steps(run) == [15, 20]  # nothing written while diverging; the last good one kept
    sane = load_config(write_config(tmp_path, tiny_mix, max_steps=30, ckpt_every=5, eval_every=0))
    with pytest.warns(UserWarning, match="schedule differs"):
        resumed = Trainer(sane, run, resume=True, progress=False)
    assert resumed.state.step == 20
    resumed.run()
    assert resumed.state.rollbacks == 0 and resumed.state.skipped_steps == 0


def test_the_rollback_target_outlives_keep_last_until_a_newer_checkpoint_proves_itself(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=60, ckpt_every=25, keep_last=1, max_bad_steps=2,
                                   eval_every=0))
    run = tmp_path / "run"
    trainer = Trainer(cfg, run, progress=False)
    trainer.run(until=50)
    # 20 good steps (train.healthy_steps' default) followed step 25: the rollback target; none followed step 50
    # yet: keep_last 1 keeps both
    assert _steps(run) == [25, 50]
    poison = _poison(trainer)
    trainer.run(until=52)  # steps 51 and 52 bad: a rollback to step 25, and step 50, unproven, is deleted
    poison.remove()
    assert trainer.state.rollbacks == 1 and _steps(run) == [25]
    assert _same_weights(trainer.model, checkpoint_dir(run) / "step-00000025")
    trainer.run()
    # the final checkpoint comes 8 good steps after the rollback: written, and step 25 kept beside it
    assert _steps(run) == [25, 60]


def test_with_checkpoints_closer_than_healthy_steps_the_next_target_outlives_keep_last_too(tmp_path, tiny_mix):
    """keep_last 1, a checkpoint every 5 steps, healthy_steps 20: each was pruned 5 steps after it was written, long
    before 20 good steps could prove it, so the target moved to a deleted checkpoint and the old one was let go. A
    rollback then fell back to the newest checkpoint, proven by nothing. The next target (the oldest checkpoint
    since the target) is kept now beside keep_last's until it is proven."""
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=40, ckpt_every=5, keep_last=1, max_bad_steps=2,
                                   eval_every=0))
    run = tmp_path / "run"
    trainer = Trainer(cfg, run, progress=False)
    trainer.run(until=30)
    # step 5, proven by step 25, is the target; step 20, the oldest since, the next (proven at 40); 30 the newest
    assert trainer.state.good_checkpoint == 5 and _steps(run) == [5, 20, 30]
    poison = _poison(trainer)
    trainer.run(until=32)  # steps 31 and 32 bad: back to step 5, and the unproven 20 and 30 are deleted
    poison.remove()
    assert trainer.state.rollbacks == 1 and _steps(run) == [5]
    assert _same_weights(trainer.model, checkpoint_dir(run) / "step-00000005")


def test_milestones_survive_timed_checkpoints_and_a_put_off_save(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=12, ckpt_every=1000, keep_last=2, keep_every=4,
                                   ckpt_every_minutes=EVERY_STEP, eval_every=0))
    Trainer(cfg, tmp_path / "timed", progress=False).run()
    assert _steps(tmp_path / "timed") == [4, 8, 11, 12]  # a checkpoint at every step; multiples of 4 kept
    # the save due at milestone 8 comes one step after a bad step: put off to 9, which is kept in its place
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=12, ckpt_every=4, keep_last=1, keep_every=4,
                                   healthy_steps=2, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "late", progress=False)
    trainer.run(until=6)
    poison = _poison(trainer)
    trainer.run(until=7)
    poison.remove()
    trainer.run()
    assert _steps(tmp_path / "late") == [4, 9, 12]


@pytest.mark.parametrize("recorded", [True, False])
def test_a_rollback_right_after_a_resume_returns_to_the_checkpoint_it_resumed_from(tmp_path, tiny_mix, recorded):
    """The checkpoint a resume starts from was saved while the run was healthy: it is the rollback target, so bad
    steps early in the resumed run (a new lr) roll back to it, where they once rolled back to the older good one
    and deleted it, losing the good steps between. A checkpoint from before felix recorded its health counts as
    healthy (`recorded` False)."""
    run = tmp_path / "run"
    cfg = dict(ckpt_every=25, keep_last=2, max_bad_steps=2, eval_every=0)
    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=50, **cfg)), run, progress=False).run()
    assert _steps(run) == [25, 50]  # step 25 is the rollback target: 20 good steps followed it
    state = checkpoint_dir(run) / "step-00000050" / "trainer.json"
    doc = json.loads(state.read_text())
    assert doc["trainer"]["good_checkpoint"] == 25
    if recorded:
        assert doc["trainer"]["saved_healthy"] is True
    else:
        doc["trainer"].pop("saved_healthy", None)
        state.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="schedule differs"):
        trainer = Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=60, **cfg)), run, resume=True,
                          progress=False)
    poison = _poison(trainer)
    trainer.run(until=52)  # steps 51 and 52 bad: a rollback
    poison.remove()
    assert trainer.state.rollbacks == 1 and _steps(run) == [25, 50]
    assert _same_weights(trainer.model, checkpoint_dir(run) / "step-00000050")


def test_a_stop_on_a_skipped_step_checkpoints_it_and_a_rollback_after_the_resume_deletes_it(tmp_path, tiny_mix,
                                                                                           capsys):
    """A signal on a bad step whose update was skipped: the weights are the step before's, finite, and saved like
    those of any stop while the run is not healthy, with a note that the last good checkpoint stays the rollback
    target. Saved unhealthy, the checkpoint stays unproven after a resume: a rollback there deletes it."""
    run = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=40, ckpt_every=10, keep_last=2, max_bad_steps=2,
                                   healthy_steps=5, eval_every=0))
    trainer = Trainer(cfg, run, progress=False)
    trainer.run(until=26)  # step 20 proven by step 25: the rollback target
    sent = []

    def bad_then_stop(module, inputs, out):
        if not sent:
            sent.append(signal.raise_signal(signal.SIGTERM))
        return out * float("nan")

    trainer.model.tok_emb.register_forward_hook(bad_then_stop)
    capsys.readouterr()
    result = trainer.run()
    assert result.interrupted == signal.SIGTERM and result.steps == 27 and trainer.state.skipped_steps == 1
    assert _steps(run) == [20, 27]
    assert (f"note: checkpointing step 27, a skipped step (its weights are the step before's); "
            f"{checkpoint_dir(run) / 'step-00000020'} stays the rollback target") in capsys.readouterr().err
    assert stop_message(result, "--resume continues it").endswith(f"saved {checkpoint_dir(run) / 'step-00000027'}; "
                                                                 f"--resume continues it")
    saved = json.loads((checkpoint_dir(run) / "step-00000027" / "trainer.json").read_text())["trainer"]
    assert saved["saved_healthy"] is False and saved["good_checkpoint"] == 20
    resumed = Trainer(cfg, run, resume=True, progress=False)
    poison = _poison(resumed)
    resumed.run(until=28)  # the stop's bad step and step 28: a rollback, past step 27
    poison.remove()
    assert resumed.state.rollbacks == 1 and _steps(run) == [20]
    assert _same_weights(resumed.model, checkpoint_dir(run) / "step-00000020")


def _tree_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_checkpoint_that_does_not_fit_is_an_error_naming_the_space_and_the_last_good_one(
        tmp_path, tiny_mix, file_size_limit, capsys):
    run = tmp_path / "run"
    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=6, ckpt_every=3, eval_every=0)), run,
            progress=False).run(until=3)
    weights = (checkpoint_dir(run) / "step-00000003" / "model.safetensors").stat().st_size
    before = _tree_files(checkpoint_dir(run))
    capsys.readouterr()
    with file_size_limit(weights // 2):  # the next model.safetensors fails midway, as on a full disk (EFBIG)
        code = main(["train", "--out", str(run), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    # the rest of the run's count (disk_needed): keep_last 2 + the one written + the rollback target and the next,
    # less step 3
    assert re.search(r"felix train: error: step 6: could not write checkpoint \S*step-00000006 \(.*\); a checkpoint "
                     r"needs \d+\.\d MiB and \S+ has [\d.]+ [MG]iB free \(the rest of the run may need \d+\.\d MiB "
                     r"more: 4 checkpoint\(s\) of \d+\.\d MiB: train\.keep_last=2, the next written before the "
                     r"oldest is pruned, the rollback target and the next one, .*\(1 here already\)\)\. Nothing of "
                     r"it was kept and the last good checkpoint is \S*step-00000003: free space and `felix train "
                     r"--out \S+ --resume`", err), err
    assert _tree_files(checkpoint_dir(run)) == before  # no partial step-6, no temp directory
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert _steps(run) == [3, 6]


def test_the_checkpoint_size_is_known_before_the_first_and_a_disk_too_small_is_named_at_the_start(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=3, ckpt_every=3, eval_every=0))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    expected = trainer.ckpt_bytes  # before the optimizer has any state
    trainer.run()
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    actual = sum(p.stat().st_size for p in ckpt.iterdir())
    tensors = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert actual <= expected <= actual + 512 * 1024 and tensors > 512 * 1024
    # more checkpoints than any disk holds: keep_last 10^9 keeps them all, with the one being written and the
    # rollback target and the next beside them (disk_needed: the count felix info gives)
    huge = load_config(write_config(tmp_path, tiny_mix, max_steps=3, keep_last=10**9, eval_every=0))
    with pytest.warns(UserWarning, match=r"\S+/big: [\d.]+ [MG]iB free on its file system, less than the [\d.]+ GiB "
                                         r"this run's checkpoints may take \(1000000003 checkpoint\(s\) of [\d.]+ MiB: "
                                         r"train\.keep_last=1000000000, the next written before the oldest is pruned, "
                                         r"the rollback target and the next one"):
        Trainer(huge, tmp_path / "big", progress=False).close()


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(1000)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly_from_the_one_before(
        tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=8, ckpt_every=2, keep_last=3, eval_every=0))
    Trainer(cfg, tmp_path / "ref", progress=False).run()
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run(until=6)
    _truncate(checkpoint_dir(run) / "step-00000006" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"step-00000006/model\.safetensors: unreadable weights .*: checkpoint "
                                         r"step-00000006 is damaged; renamed it step-00000006\.corrupt .* went on "
                                         r"from step-00000004, 2 steps earlier"):
        trainer = Trainer(cfg, run, resume=True, progress=False)
    assert trainer.state.step == 4 and (checkpoint_dir(run) / "step-00000006.corrupt").is_dir()
    trainer.run()
    assert losses(run) == losses(tmp_path / "ref")
    assert _steps(run) == [4, 6, 8]  # the .corrupt one is neither listed nor counted by keep_last
    # a rollback whose target is damaged goes to the one before it
    longer = load_config(write_config(tmp_path, tiny_mix, max_steps=12, ckpt_every=2, keep_last=3, max_bad_steps=2,
                                      eval_every=0))
    with pytest.warns(UserWarning, match="schedule differs"):
        trainer = Trainer(longer, run, resume=True, progress=False)
    _truncate(checkpoint_dir(run) / "step-00000008" / "optimizer.safetensors")
    poison = _poison(trainer)
    trainer.run(until=10)
    poison.remove()
    assert trainer.state.rollbacks == 1 and _same_weights(trainer.model, checkpoint_dir(run) / "step-00000006")
    assert sorted(p.name for p in checkpoint_dir(run).iterdir()) == [
        "step-00000004", "step-00000006", "step-00000006.corrupt", "step-00000008.corrupt"]


def test_a_lone_damaged_checkpoint_is_an_error_and_stays_where_it_is(tmp_path, tiny_mix):
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=2, ckpt_every=2, warmup_steps=1, eval_every=0))
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run()
    _truncate(checkpoint_dir(run) / "step-00000002" / "model.safetensors")
    with pytest.raises(FelixError, match=r"step-00000002/model\.safetensors: unreadable weights"):
        Trainer(cfg, run, resume=True, progress=False)
    assert _steps(run) == [2]


def _three_checkpoints_the_last_patched(run: Path):
    """Checkpoints 1, 2 and 3 of one model in `run`, a splice patch beside 3; (model, optimizer)."""
    import copy

    from test_checkpoint import trained

    from felix.checkpoint import save_checkpoint
    from felix.patches import PatchStack

    cfg, model, opt = trained(1)
    for step in (1, 2, 3):
        save_checkpoint(run, step, model, cfg, {}, opt)
    edited, name = copy.deepcopy(model), "layers.0.mlp.splice.a"
    PatchStack.open(checkpoint_dir(run) / "step-00000003").apply(
        edited, {name: edited.splice_state()[name] + 0.1}, {"method": "test"})
    return model, opt


def test_a_rollback_keeps_a_newer_checkpoint_that_holds_patches(tmp_path):
    """Before: a rollback deleted every checkpoint written after its target, `felix splice apply`'s edits (its patch
    stack) with one, while pruning (`holds_patches`) already spared them."""
    from felix.distributed import DistInfo
    from felix.patches import PatchStack
    from felix.train_resume import roll_back
    from felix.train_state import TrainState

    model, opt = _three_checkpoints_the_last_patched(tmp_path)
    state = TrainState(step=5, good_checkpoint=1, bad_steps=2)
    path, lines = roll_back(tmp_path, state, 3, model, opt, torch.device("cpu"), "loss is nan", DistInfo())
    assert path.name == "step-00000001" and _steps(tmp_path) == [1, 3]
    assert [line.split(":")[0].split(",")[0] for line in lines] == ["deleted step-00000002", "kept step-00000003"]
    assert "holds splice patches" in lines[1] and "Roll its patches back, or delete it" in lines[1]
    assert len(PatchStack.open(checkpoint_dir(tmp_path) / "step-00000003").list()) == 1


def test_a_rollback_with_no_target_on_disk_never_takes_a_newer_checkpoint_kept_for_its_patches(tmp_path):
    """Before: with no known-good checkpoint on disk every checkpoint was a candidate, newest first, so a rollback took
    one a previous rollback had kept only for its splice patches (never followed by healthy training) over the
    run's own newest checkpoint since."""
    from felix.distributed import DistInfo
    from felix.train_resume import roll_back
    from felix.train_state import TrainState

    model, opt = _three_checkpoints_the_last_patched(tmp_path)
    # the target (step 1) is gone; the run went on from step 2 and has not proven it yet
    shutil.rmtree(checkpoint_dir(tmp_path) / "step-00000001")
    state = TrainState(step=6, good_checkpoint=1, bad_steps=2)
    path, lines = roll_back(tmp_path, state, 3, model, opt, torch.device("cpu"), "loss is nan", DistInfo(), [2])
    assert path.name == "step-00000002" and _steps(tmp_path) == [2, 3]
    assert lines[0].startswith("kept step-00000003")
