"""Run metrics: `metrics.jsonl` (one line per optimizer step), TensorBoard when installed, the progress (a bar
on a terminal, plain lines elsewhere) and the gradient norm's summary over a run."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from felix.atomic import atomic_write_text


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and infinities as null: JSON has no spelling for them (json.dumps writes NaN, which
    strict readers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete JSON object lines of a metrics file: a line cut off by a crash, or damaged on disk (bytes that are
    not UTF-8, JSON that is not an object), is dropped rather than stopping a resume or a report."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLog:
    """Append-only JSONL of one run. On resume, rows past the checkpoint's step are dropped first, because the
    resumed run recomputes exactly those steps. Otherwise a log already there is an earlier attempt's (one that
    left no checkpoint to resume, or another run's): it is moved aside to `metrics.earlier-N.jsonl`, neither
    mixed into this run's rows nor deleted, and the TensorBoard directory with it to `tb.earlier-N`."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        tb_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        if resume_step is not None:
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif self.path.exists() and self.path.stat().st_size > 0:
            n = _free_earlier_number(self.path, tb_dir)
            aside = self.path.with_name(f"{self.path.stem}.earlier-{n}{self.path.suffix}")
            moved = ""
            if tb_dir is not None and tb_dir.exists():
                # the attempt's event files go with its rows: left in place, only a purge hid them, and
                # readers that ignore it drew both runs. Moved first: a kill between the two renames then
                # leaves the rows in place to be moved by the next start, not the events to be mixed in.
                tb_aside = tb_dir.rename(tb_dir.with_name(f"{tb_dir.name}.earlier-{n}"))
                moved = f" (its TensorBoard events to {tb_aside.name})"
            self.path.rename(aside)
            warnings.warn(f"{self.path} held an earlier attempt's rows; moved to {aside.name}{moved} so this "
                          f"log describes this run alone", stacklevel=2)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self._tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                # Events of the steps a resumed run recomputes (or of a fresh run's earlier attempt) are hidden,
                # as the JSONL drops its rows; without it TensorBoard drew both.
                _wait_past_newest_events(tb_dir)
                self._tb = SummaryWriter(str(tb_dir), purge_step=0 if resume_step is None else resume_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        # Flushed per line: the OS keeps it even if the process is SIGKILLed.
        self._file.write(json.dumps(json_safe(row)) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step" and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _wait_past_newest_events(tb_dir: Path) -> None:
    """Sleep into the next second if an event file in `tb_dir` was opened in this one. TensorBoard reads a run's
    files in name order, and a name is the opening second, then a per-process counter without padding: two
    writers opened in one second can sort the wrong way round (...9 after ...10), and the purge of the later
    one is lost. Only a writer reopened within a second (tests, `run(until=...)` then `run()`) ever waits."""
    now = time.time()
    stamps = [f.name.split(".")[3] for f in tb_dir.glob("events.out.tfevents.*")]
    if any(s.isdigit() and int(s) >= int(now) for s in stamps):
        time.sleep(int(now) + 1 - now)


def _free_earlier_number(path: Path, tb_dir: Path | None) -> int:
    """The first N for which neither `metrics.earlier-N.jsonl` beside `path` nor `tb.earlier-N` beside `tb_dir`
    exists: no earlier attempt's log or events are overwritten, and both of one attempt share its N."""
    n = 1
    while path.with_name(f"{path.stem}.earlier-{n}{path.suffix}").exists() or (
            tb_dir is not None and tb_dir.with_name(f"{tb_dir.name}.earlier-{n}").exists()):
        n += 1
    return n


def grad_norms(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, gradient norm before clipping) of the logged steps whose norm was finite (metrics.jsonl writes a
    non-finite one as null)."""
    return [(r["step"], r["grad_norm"]) for r in rows
            if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"])]


def grad_norm_summary(rows: list[dict], grad_clip: float) -> dict | None:
    """The gradient norm before clipping over a run's logged steps: its median, how many steps it was clipped at,
    and the largest with its step. At a constant lr a rising median, or spikes, say the lr is too high (EXP-46aw)."""
    norms = grad_norms(rows)
    if not norms:
        return None
    step, largest = max(norms, key=lambda n: n[1])
    return {"median": statistics.median(g for _, g in norms), "clip": grad_clip,
            "clipped": sum(g > grad_clip for _, g in norms), "steps": len(norms), "max": largest, "max_step": step}


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Optimizer steps as they pass, with loss, gradient norm, tok/s, MFU and ETA: a tqdm bar on a terminal;
    elsewhere (nohup, the systemd journal, a scheduler's log), where a bar's carriage-return redraws pile into one
    physical line, one plain line every `every` steps (and at the last)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 is_main: bool = True, every: int = 1, stream: TextIO | None = None):
        self.is_main = is_main  # under torchrun only rank 0 draws or speaks
        self.stream = stream if stream is not None else sys.stderr
        show, tty = enabled and is_main, _is_tty(self.stream)
        self.lines = show and not tty
        self.bar = tqdm(
            total=total, initial=initial, disable=not (show and tty), desc=desc, unit="step",
            dynamic_ncols=True, file=self.stream, mininterval=0.5,
        )
        self.desc, self.total, self.every = desc, total, every
        self.step, self._first, self._t0 = initial, initial, time.monotonic()

    def update(self, loss: float, tok_per_s: float, mfu: float | None, lr: float | None = None,
               grad_norm: float | None = None) -> None:
        """One step more, with its loss, throughput, MFU, learning rate and gradient norm (before clipping)."""
        self.step += 1
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_per_s:,.0f}"}
        if grad_norm is not None:
            post["gnorm"] = f"{grad_norm:.2f}"
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if self.lines and (self.step % self.every == 0 or self.step == self.total):
            self._line(loss, tok_per_s, mfu, lr, grad_norm)

    def _line(self, loss: float, tok_per_s: float, mfu: float | None, lr: float | None,
              grad_norm: float | None) -> None:
        elapsed = time.monotonic() - self._t0
        # the pace of this process's steps so far, evaluations and checkpoints included: what the rest will take
        eta = elapsed / (self.step - self._first) * (self.total - self.step)
        parts = [f"{self.desc} step {self.step}/{self.total}", f"loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        if grad_norm is not None:  # rising at a constant lr, or spiking, says the lr is too high
            parts.append(f"gnorm {grad_norm:.3g}")
        parts.append(f"{tok_per_s:,.0f} tok/s")
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}, eta {tqdm.format_interval(eta)}")
        with contextlib.suppress(OSError):  # stderr gone (a closed pipe): the run goes on
            print(" | ".join(parts), file=self.stream, flush=True)

    def write(self, text: str) -> None:
        if self.is_main:  # warnings still show with the bar off
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        self.bar.close()
