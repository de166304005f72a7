"""What every rank of a training run decides together once per step: whether to stop (a SIGINT or SIGTERM on any
rank asked to) and whether a wall-clock checkpoint is due (rank 0's clock). Under torchrun both ride one small
all_reduce; a single process needs no collective."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from felix.checkpoint import latest_checkpoint, step_of
from felix.distributed import DistInfo
from felix.signal_handlers import restore_handlers, set_handlers
from felix.train_state import TrainResult

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While installed, the first SIGINT or SIGTERM only records a request to stop (`signum`); a second SIGINT (a
    person pressing Ctrl-C again) interrupts at once (KeyboardInterrupt). A repeated SIGTERM changes nothing: the
    stop it asks for is under way, and senders repeat it (systemd's control-group stop and `scancel` signal every
    process, and torchrun forwards its own to each rank, so a rank gets two)."""

    def __init__(self, label: str = ""):
        self.signum: int | None = None
        self.label = label  # "rank N: " under torchrun
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM; only the main thread can, elsewhere they keep their handlers."""
        self._previous = set_handlers(STOP_SIGNALS, self._handle)

    def restore(self) -> None:
        restore_handlers(self._previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        name = signal.Signals(signum).name
        text = f"\n{self.label}{name}: stopping after this step; press Ctrl-C again to stop at once\n"
        os.write(2, text.encode())  # not print: the signal may have come in the middle of a write to stderr


class StepControl:
    """The per-step decisions that every rank must take alike, or the checkpoint's collectives deadlock."""

    def __init__(self, ckpt_every_minutes: float | None, info: DistInfo, device: torch.device):
        self.seconds = None if ckpt_every_minutes is None else 60.0 * ckpt_every_minutes
        self.info, self.device = info, device
        self.signals = StopSignals(f"rank {info.rank}: " if info.enabled else "")
        self.stopped_by = 0  # the signal every rank agreed to stop on; a stopped run stays stopped
        self.reset()

    def reset(self) -> None:
        """Restart the wall-clock interval (train.ckpt_every_minutes): a checkpoint was just written."""
        self.since = time.monotonic()

    def decide(self) -> tuple[int, bool]:
        """(the signal to stop on, or 0; whether a timed checkpoint is due), the same on every rank. Under torchrun
        one all_reduce(MAX) of [this rank's stop signal, rank 0's timer verdict]: each rank by its own clock could
        disagree, and a signal may reach the ranks at different steps."""
        due = self.seconds is not None and time.monotonic() - self.since >= self.seconds
        signum = self.signals.signum or 0
        if self.info.enabled:
            flags = torch.tensor([float(signum), float(due and self.info.is_main)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, due = (int(v) for v in flags.tolist())
        self.stopped_by = self.stopped_by or signum
        return signum, bool(due)


def stop_message(result: TrainResult, resume_hint: str) -> str:
    """What a run stopped by `result.interrupted` saved, and how to continue it (`resume_hint`: "X continues it")."""
    head = f"stopped by {signal.Signals(result.interrupted).name} after step {result.steps}"
    last = latest_checkpoint(result.out_dir)
    if last is not None and step_of(last) == result.steps:
        return f"{head}; saved {last}; {resume_hint}"
    if last is not None:  # the step was bad: its weights may be the damage itself
        return (f"{head}, a bad step whose weights are not checkpointed; {resume_hint} from the last good "
                f"checkpoint, {last}")
    return f"{head}, a bad step, before any checkpoint was written: nothing is saved and a rerun starts afresh"
