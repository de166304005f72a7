"""Which checkpoints a training run writes and keeps. A due checkpoint waits until the run is healthy
(train.healthy_steps good steps since its last bad step or rollback); the rollback target (the last checkpoint
healthy training went on from) and the next one to prove itself outlive keep_last. Also the disk the run's
checkpoints need (`disk_needed`, for felix info/plan too), checked at the start and named when a write fails."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from felix import checkpoint as ckpt_io
from felix.config import TrainConfig
from felix.errors import FelixError
from felix.train_state import TrainState


def healthy(state: TrainState, tc: TrainConfig) -> bool:
    """Whether the last train.healthy_steps steps were all good (or none has been bad yet)."""
    return state.last_bad_step is None or state.step - state.last_bad_step >= tc.healthy_steps


def confirm(state: TrainState, tc: TrainConfig, unproven: list[int]) -> bool:
    """After a good step: end a divergence episode once healthy, and make the newest of the checkpoints written since
    the rollback target (`unproven`, their steps) that train.healthy_steps good steps in a row followed the new
    target, dropping it and older ones from `unproven`. True when the target moved."""
    if not healthy(state, tc):
        return False
    state.rollback_tries = 0
    proven = [s for s in unproven if s <= state.step - tc.healthy_steps]
    if not proven:
        return False
    state.good_checkpoint = max(proven)
    unproven[:] = [s for s in unproven if s > state.good_checkpoint]
    return True


def rollback_candidates(out_dir: Path, state: TrainState, unproven: Sequence[int] = ()) -> list[Path]:
    """The checkpoints a rollback may return to, best first: the last known good one and those before it, or,
    before any is known good (or when it is gone), every checkpoint up to the newest of `unproven` (those this run
    wrote since its target), newest first. Never one newer than those: such a one was kept by a rollback only for
    its splice patches, and was not followed by healthy training."""
    ckpts = ckpt_io.list_checkpoints(out_dir)
    good = state.good_checkpoint
    if good is not None and any(ckpt_io.step_of(p) == good for p in ckpts):
        ckpts = [p for p in ckpts if ckpt_io.step_of(p) <= good]
    elif unproven:
        ckpts = [p for p in ckpts if ckpt_io.step_of(p) <= max(unproven)]
    return ckpts[::-1]


def last_good(out_dir: Path, state: TrainState, unproven: Sequence[int] = ()) -> Path | None:
    """The checkpoint a rollback would return to now."""
    return next(iter(rollback_candidates(out_dir, state, unproven)), None)


def protected(state: TrainState, unproven: Sequence[int] = ()) -> tuple[int, ...]:
    """The steps pruning must spare besides keep_last's and keep_every's: the rollback target and the oldest of
    `unproven` (checkpoints since the target, oldest first; empty at a save that ends the run). The latter because
    `confirm` proves the oldest next, and checkpoints closer than healthy_steps would push it out of keep_last first."""
    return tuple(s for s in (state.good_checkpoint, *unproven[:1]) if s is not None)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or the nearest directory above it that exists)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


class DiskNeed(NamedTuple):
    """What `disk_needed` counts: checkpoints to make room for, of which keep_every milestones, their bytes, and
    why (a sentence for the user)."""

    checkpoints: int
    milestones: int
    bytes: int
    why: str


def _final_window_start(tc: TrainConfig) -> int:
    """The oldest step among the last train.keep_last checkpoints of a run on schedule (multiples of ckpt_every
    and keep_every, and max_steps); with ckpt_every_minutes a timed one may come at any step."""
    if tc.ckpt_every_minutes:
        return max(1, tc.max_steps - tc.keep_last + 1)
    steps = {tc.max_steps}
    for every in (tc.ckpt_every, tc.keep_every):
        if every:
            last = tc.max_steps // every * every
            steps.update(range(last, max(0, last - tc.keep_last * every), -every))
    return sorted(steps)[-tc.keep_last:][0]


def disk_needed(tc: TrainConfig, nbytes: int, from_step: int = 0, present: Sequence[Path] = ()) -> DiskNeed:
    """The disk a run's checkpoints (`nbytes` each: `felix.checkpoint.checkpoint_bytes`) may take at once from
    `from_step` on, beyond the checkpoints `present` in its directory (oldest first): the one count behind `felix
    info`/`plan`, the trainer's start warning and its full-disk error. A bound: keep_last, the next one written
    before the oldest is pruned, the two `protected` ones, and each keep_every milestone ahead but those among the
    schedule's last keep_last checkpoints."""
    window = len(set(present) - ckpt_io.milestones(list(present), tc.keep_every))
    count = max(1, tc.keep_last + 3 - window)
    why = (f"train.keep_last={tc.keep_last}, the next written before the oldest is pruned, the rollback target and "
           f"the next one, each kept until a newer checkpoint has had train.healthy_steps={tc.healthy_steps} good "
           f"steps")
    if window:
        why += f" ({window} here already)"
    ahead = 0
    if tc.keep_every:
        ahead = max(0, (_final_window_start(tc) - 1) // tc.keep_every - from_step // tc.keep_every)
        why += f", and {ahead} milestone(s) of train.keep_every={tc.keep_every} kept for good"
    count += ahead
    return DiskNeed(count, ahead, count * nbytes, f"{count} checkpoint(s) of {_gib(nbytes)}: {why}")


def space_warning(out_dir: Path, tc: TrainConfig, nbytes: int, step: int) -> str | None:
    """A warning when the file system of `out_dir` has less free space than the run's checkpoints will need."""
    _, _, need, why = disk_needed(tc, nbytes, step, ckpt_io.list_checkpoints(out_dir))
    free = _free_bytes(out_dir)
    if free >= need:
        return None
    return (f"{out_dir}: {_gib(free)} free on its file system, less than the {_gib(need)} this run's checkpoints "
            f"may take ({why}); a checkpoint that does not fit stops the run. Free space, or lower train.keep_last")


def write_failure(exc: BaseException, target: Path, nbytes: int, tc: TrainConfig, good: Path | None) -> FelixError:
    """The error for a checkpoint write that failed (a full disk): what it needed, what is free, and what is
    left to resume from. `atomic_dir` has removed the partial write; the older checkpoints are untouched."""
    free = _free_bytes(target.parent)
    step = ckpt_io.step_of(target)
    _, _, need, why = disk_needed(tc, nbytes, step - 1, ckpt_io.list_checkpoints(target.parent.parent))
    left = f"the last good checkpoint is {good}" if good is not None else "there is no earlier checkpoint"
    return FelixError(f"step {step}: could not write checkpoint {target} ({exc}); a checkpoint needs {_gib(nbytes)} "
                      f"and {target.parent} has {_gib(free)} free (the rest of the run may need {_gib(need)} more: "
                      f"{why}). Nothing of it was kept and {left}: free space and `felix train --out "
                      f"{target.parent.parent} --resume` continues from it")


def checkpoint_note(state: TrainState, good: Path | None) -> str:
    """What a checkpoint written while the run is not healthy (at its end, on a signal) says: `good` stays the
    rollback target."""
    since = state.step - state.last_bad_step
    what = "a skipped step (its weights are the step before's)" if not since else f"{since} step(s) after a bad one"
    return f"note: checkpointing step {state.step}, {what}; {good} stays the rollback target"
