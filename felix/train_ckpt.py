"""Which checkpoints a training run writes and keeps, for runs of weeks: a due checkpoint waits until the run is
healthy (train.healthy_steps good steps in a row since its last bad step or rollback), so none is written in the
middle of a divergence; the last checkpoint known good (one that healthy training went on from), the rollback
target, stays on disk whatever keep_last says until a newer one has proven itself; a disk too small for the run is
named at its start, and a checkpoint write that fails for space is an error that says what it needed."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def rollback_candidates(out_dir: Path, state: TrainState) -> list[Path]:
    """The checkpoints a rollback may return to, best first: the last known good one and those before it, or,
    before any is known good (or when it is gone), every checkpoint, newest first."""
    ckpts = ckpt_io.list_checkpoints(out_dir)
    good = state.good_checkpoint
    if good is not None and any(ckpt_io.step_of(p) == good for p in ckpts):
        ckpts = [p for p in ckpts if ckpt_io.step_of(p) <= good]
    return ckpts[::-1]


def protected(state: TrainState) -> tuple[int, ...]:
    """The steps pruning must spare besides keep_last's and keep_every's: the rollback target."""
    return () if state.good_checkpoint is None else (state.good_checkpoint,)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or the nearest directory above it that exists)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def space_needed(out_dir: Path, tc: TrainConfig, nbytes: int, step: int) -> tuple[int, str]:
    """How many bytes the checkpoints this run will still write may take at once on top of those in `out_dir`
    (each `nbytes`), and why: keep_last + 1 (the next is written before the oldest is pruned) less those already
    there, at least one, plus a milestone per multiple of keep_every still ahead."""
    ckpts = ckpt_io.list_checkpoints(out_dir)
    window = len(set(ckpts) - ckpt_io.milestones(ckpts, tc.keep_every))
    count = max(1, tc.keep_last + 1 - window)
    why = f"train.keep_last={tc.keep_last} keeps {tc.keep_last} and writes the next before pruning the oldest"
    if window:
        why += f" ({window} here already)"
    if tc.keep_every:
        ahead = tc.max_steps // tc.keep_every - step // tc.keep_every
        count += ahead
        why += f", and train.keep_every={tc.keep_every} keeps {ahead} more for good"
    return count * nbytes, f"{count} checkpoint(s) of {_gib(nbytes)}: {why}"


def space_warning(out_dir: Path, tc: TrainConfig, nbytes: int, step: int) -> str | None:
    """A warning when the file system of `out_dir` has less free space than the run's checkpoints will need."""
    need, why = space_needed(out_dir, tc, nbytes, step)
    free = _free_bytes(out_dir)
    if free >= need:
        return None
    return (f"{out_dir}: {_gib(free)} free on its file system, less than the {_gib(need)} this run's checkpoints "
            f"may take ({why}); a checkpoint that does not fit stops the run. Free space, or lower train.keep_last")


def write_failure(exc: BaseException, target: Path, nbytes: int, keep_last: int, last_good: Path | None) -> FelixError:
    """The error for a checkpoint write that failed (a full disk): what it needed, what is free, and what is
    left to resume from. `atomic_dir` has removed the partial write; the older checkpoints are untouched."""
    free = _free_bytes(target.parent)
    left = (f"the last good checkpoint is {last_good}" if last_good is not None else "there is no earlier checkpoint")
    return FelixError(f"step {ckpt_io.step_of(target)}: could not write checkpoint {target} ({exc}); a checkpoint "
                      f"needs {_gib(nbytes)} and {target.parent} has {_gib(free)} free (train.keep_last={keep_last} "
                      f"holds {keep_last + 1} at once, {_gib((keep_last + 1) * nbytes)}: the next is written before "
                      f"the oldest is pruned). Nothing of it was kept and {left}: free space and `felix train --out "
                      f"{target.parent.parent} --resume` continues from it")
