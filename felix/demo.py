"""The whole recipe at toy scale, from nothing: corpus → tokenizer → shards → mix → train → report.

Every stage writes its output atomically under the demo directory and is skipped when that output
already exists, so an interrupted demo picks up where it stopped (training resumes from its last
checkpoint). wall_time.json there adds up the seconds of every run into the directory, for the report. One demo
at a time holds the directory (felix.run_lock): a second one into it is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from felix.atomic import atomic_write_text, check_output
from felix.checkpoint import latest_checkpoint
from felix.config import FelixConfig, load_config
from felix.corpus import build_stdlib_corpus, iter_documents
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError, RunStopped
from felix.metrics import grad_norm_summary, read_metrics
from felix.report import greedy_samples, plot_losses
from felix.run_lock import lock_run_dir
from felix.shards import ShardSet, write_shards
from felix.tokenizer import FelixTokenizer, train_tokenizer
from felix.train_control import stop_message
from felix.trainer import Trainer

# Target shares of the demo mix; a source the corpus lacks (no shipped task samples) is dropped.
DEMO_WEIGHTS = {"code": 0.55, "docs": 0.35, "tasks": 0.10}
DEFAULT_CORPUS_BYTES = 8_000_000
DEFAULT_BUDGET_MINUTES = 8.0  # the whole demo; the issue's bound is 10 minutes on 2 cores
REPORT_SECONDS = 30  # kept free of training for the final evaluation, samples and plot
VAL_TOKENS = 1024  # the least held-out text per source (write_shards' min_val_tokens)
WALL_TIME_FILE = "wall_time.json"
WALL_TIME_EVERY = 10.0  # seconds between saves of the running total: what a killed run can lose


@dataclass
class DemoResult:
    out_dir: Path
    report: dict
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


class _Stage:
    """Times a pipeline stage and announces it."""

    def __init__(self, name: str, seconds: dict[str, float]):
        self.name, self.seconds = name, seconds

    def __enter__(self) -> _Stage:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds[self.name] = round(time.perf_counter() - self.t0, 2)


class WallClock:
    """The demo's wall time over every run into `out_dir`, kept current in wall_time.json as
    {"runs": n, "seconds": s}: saved every WALL_TIME_EVERY seconds and when the run ends, however it
    ends, so an interrupted or killed run still counts in the report of the one that finishes."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / WALL_TIME_FILE
        self.before = read_wall_time(self.path)
        self.t0 = time.perf_counter()
        self.elapsed: float | None = None  # this run's seconds, once stopped
        self._final: dict | None = None
        self._stopped = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name="demo-wall-clock", daemon=True)
        self._beat.start()

    def _beat_loop(self) -> None:
        while not self._stopped.wait(WALL_TIME_EVERY):
            with contextlib.suppress(OSError):  # a full disk is no reason to stop training; stop() reports it
                self._write(time.perf_counter() - self.t0)

    def _write(self, elapsed: float) -> dict:
        record = {"runs": self.before["runs"] + 1, "seconds": round(self.before["seconds"] + elapsed, 2)}
        atomic_write_text(self.path, json.dumps(record) + "\n")
        return record

    def stop(self) -> dict:
        """Save the total (the earlier runs and this one) and return it; later calls return it unchanged."""
        if self._final is None:
            self.elapsed = time.perf_counter() - self.t0
            self._stopped.set()
            self._beat.join()  # no beat writes after the final total
            self._final = self._write(self.elapsed)
        return self._final


def read_wall_time(path: Path) -> dict:
    """{"runs", "seconds"} of the earlier runs recorded in `path` (none when it does not exist)."""
    if not path.is_file():
        return {"runs": 0, "seconds": 0.0}
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FelixError(f"{path}: unreadable ({exc}); delete it to count the wall time from this run") from None
    runs, seconds = (found.get("runs"), found.get("seconds")) if isinstance(found, dict) else (None, None)
    if not (type(runs) is int and runs >= 1 and type(seconds) in (int, float) and 0 <= seconds < math.inf):
        raise FelixError(f"{path}: expected {{\"runs\": n >= 1, \"seconds\": s >= 0}}, found {found!r}; delete it "
                         "to count the wall time from this run")
    return {"runs": runs, "seconds": float(seconds)}


def demo_weights(facts_weight: float = 0.0) -> dict[str, float]:
    """The demo mix's target shares; with `facts_weight` > 0 the `facts` source takes that share and the
    others keep their proportions."""
    if not 0 <= facts_weight < 1:
        raise FelixError(f"the facts weight must be in [0, 1), got {facts_weight}")
    # 6 significant digits: mix.yaml reads 0.44, not 0.44000000000000006 (the weights need not sum to 1)
    weights = {k: float(f"{v * (1 - facts_weight):.6g}") for k, v in DEMO_WEIGHTS.items()}
    return weights | ({"facts": facts_weight} if facts_weight else {})


def _shares(mix: DataMix) -> dict[str, float]:
    return {k: round(v, 6) for k, v in mix.targets().items()}


def _same_shares(a: DataMix, b: DataMix) -> bool:
    """The same sources at the same shares, but for rounding (a mix.yaml written before weights were rounded)."""
    x, y = a.targets(), b.targets()
    return x.keys() == y.keys() and all(math.isclose(x[k], y[k], abs_tol=1e-6) for k in x)


def prepare_data(out_dir: Path, vocab_size: int, corpus_bytes: int, seed: int,
                 seconds: dict[str, float], facts_weight: float = 0.0) -> tuple[Path, Path]:
    """Corpus, tokenizer, shards and mix for the demo; returns (tokenizer path, mix path)."""
    weights = demo_weights(facts_weight)
    corpus_dir, tok_path = out_dir / "corpus", out_dir / "tokenizer.json"
    shard_root, mix_path = out_dir / "shards", out_dir / "mix.yaml"
    # The corpus stage rebuilds a corpus asked for with other parameters, but the tokenizer and shards are
    # skipped when present: built from the old corpus, they would silently train on the old data.
    built = {"corpus_bytes": corpus_bytes, "vocab_size": vocab_size, "seed": seed, "facts": facts_weight > 0}
    built_path = out_dir / "data.json"
    # Only a tokenizer or shards hold the old data: before them (an earlier attempt failed or was stopped in
    # the corpus stage) the record is rewritten, where refusing it would leave the directory unusable.
    data_built = tok_path.is_file() or shard_root.exists()
    if built_path.is_file():
        try:
            found = json.loads(built_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FelixError(f"{built_path}: unreadable ({exc}); use another --out") from None
        if data_built and found != built:
            raise FelixError(f"{built_path}: an earlier demo here built its data with {found}, this one asks "
                             f"for {built}; use another --out")
    if not data_built:  # fresh data (a tokenizer from before this file is left unchecked)
        atomic_write_text(built_path, json.dumps(built) + "\n")
    with _Stage("corpus", seconds):
        if not corpus_dir.is_dir():
            _say(f"building the corpus ({corpus_bytes / 1e6:g} MB) from the Python standard library")
        sources = build_stdlib_corpus(corpus_dir, max_bytes=corpus_bytes, seed=seed, facts=facts_weight > 0)
    with _Stage("tokenizer", seconds):
        if not tok_path.is_file():
            _say(f"training a {vocab_size}-token byte-level BPE tokenizer")
            train_tokenizer(list(sources.values()), vocab_size, tok_path)
        tokenizer = FelixTokenizer.load(tok_path)
    with _Stage("shards", seconds):
        mix_sources = []
        for name, path in sources.items():
            if name not in weights:
                continue
            shard_dir = shard_root / name
            if not (shard_dir / "index.json").is_file():
                _say(f"tokenizing source {name!r} into shards")
                # 2% held out: the stdlib sources have few, long documents, and every source should
                # have validation windows; at least VAL_TOKENS (8 of the 128-token windows the splice
                # budget reads), since 2% of the small facts and tasks sources is one short document
                write_shards(iter_documents(path), tokenizer, shard_dir, val_fraction=0.02, seed=seed,
                             min_val_tokens=VAL_TOKENS)
            ShardSet.open(shard_dir)
            mix_sources.append(MixSource(name=name, shards=Path("shards") / name, weight=weights[name]))
        mix = DataMix(sources=mix_sources)
        if not mix_path.is_file():
            mix.write(mix_path)
        elif not _same_shares(found := DataMix.load(mix_path), mix):
            raise FelixError(f"{mix_path}: an earlier demo here mixed {_shares(found)}, this one asks for "
                             f"{_shares(mix)}; use another --out")
    return tok_path, mix_path


def fit_to_budget(trainer: Trainer, deadline: float) -> dict | None:
    """Shorten the run so training ends by `deadline` (a perf_counter time), from the pace of its first
    steps. They are still warmup, whose learning rates do not depend on the run's length, so the run is
    exactly one configured with the shorter length. Returns what was done, or None (it fits, the warmup is too
    short to measure in, or a signal stopped the probe). A demo stopped inside its probe probes on from there."""
    tc = trainer.cfg.train
    probe = min(10, tc.warmup_steps - 1)
    start = trainer.state.step
    if probe < 3 or tc.decay_start_step is not None or start >= probe:
        return None
    t0 = time.perf_counter()
    trainer.run(until=probe)
    if trainer.state.step < probe:  # stopped on a signal: no pace to go by, and the run ends here
        return None
    rows = read_metrics(trainer.out_dir / "metrics.jsonl")
    # this process's first step pays warm-up
    dts = sorted(r["dt"] for r in rows if r.get("dt") is not None and r["step"] > start + 1)
    # a train.log_every past the probe logs none of its steps: its wall time, warm-up included, will do
    step_s = dts[len(dts) // 2] if dts else (time.perf_counter() - t0) / (probe - start)
    left = max(0.0, deadline - time.perf_counter()) / (1.1 * step_s)  # +10%: evals, checkpoints
    if left >= tc.max_steps - probe:  # compared as a float: a huge budget makes it inf
        return None
    steps = max(probe + int(left), 2 * tc.warmup_steps)  # below that the decay would start inside the warmup
    if steps >= tc.max_steps:  # a warmup over half the run leaves nothing to cut
        return None
    budget = {"config_steps": tc.max_steps, "steps": steps, "seconds_per_step": round(step_s, 3)}
    trainer.set_max_steps(steps)
    return budget


def run_demo(out_dir: Path, config: str | Path = "demo", overrides: list[str] | None = None,
             corpus_bytes: int = DEFAULT_CORPUS_BYTES, progress: bool = True, facts_weight: float = 0.0,
             budget_minutes: float | None = DEFAULT_BUDGET_MINUTES) -> DemoResult:
    """Run every stage of the recipe into `out_dir` and write `report.md` / `report.json` there. With
    `budget_minutes`, a machine too slow to train the configured steps in time trains fewer, unless the
    overrides set train.max_steps."""
    out_dir = Path(out_dir)
    cfg = load_config(config, overrides)
    demo_weights(facts_weight)  # refused before the directory and a run in wall_time.json exist
    check_output(out_dir, directory=True, into=True)  # a file there or on its path: named, not a traceback
    out_dir.mkdir(parents=True, exist_ok=True)
    read_wall_time(out_dir / WALL_TIME_FILE)  # before any work, the lock file included: an unreadable record is named
    # One demo per directory for its whole pipeline: a second one would rebuild the data stages under the first
    # and count itself in wall_time.json before the trainer's own lock (on run/) refused it. Before the clock:
    # a refused demo is no run into the directory.
    with lock_run_dir(out_dir):
        clock = WallClock(out_dir)
        try:
            return _run_stages(out_dir, cfg, overrides, corpus_bytes, progress, facts_weight, budget_minutes, clock)
        finally:
            clock.stop()  # an interrupted or failed run's seconds count too


def _run_stages(out_dir: Path, cfg: FelixConfig, overrides: list[str] | None, corpus_bytes: int, progress: bool,
                facts_weight: float, budget_minutes: float | None, clock: WallClock) -> DemoResult:
    """run_demo's stages, timed by `clock`."""
    seconds: dict[str, float] = {}
    t_start = clock.t0
    tok_path, mix_path = prepare_data(out_dir, cfg.model.vocab_size, corpus_bytes, cfg.train.seed, seconds,
                                      facts_weight)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": str(tok_path),
                                                                     "mix": str(mix_path)})})
    run_dir = out_dir / "run"
    with _Stage("train", seconds):
        resume = latest_checkpoint(run_dir) is not None  # an interrupted demo continues
        budgeted = bool(budget_minutes) and not any(o.startswith("train.max_steps=") for o in overrides or [])
        budget_path = out_dir / "budget.json"  # how a budget shortened this run, for a resumed run's report
        budget = None
        if resume:
            steps = load_config(run_dir / "config.yaml").train.max_steps  # the trainer keeps it current
            if budgeted:  # at the length it was given, which a budget may have shortened
                cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})
                if budget_path.is_file():
                    budget = json.loads(budget_path.read_text(encoding="utf-8"))
            elif steps != cfg.train.max_steps:
                # Continuing a finished (decayed) run to another length is no run of the recipe: its lr would
                # climb back from zero, and the report would describe a schedule that never ran.
                raise FelixError(f"{run_dir}: an earlier demo here trains {steps} steps, this one asks for "
                                 f"{cfg.train.max_steps}; use another --out")
        else:
            budget_path.unlink(missing_ok=True)  # left by an attempt killed before its first checkpoint
        trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
        _say(f"training {trainer.params / 1e6:.2f}M parameters for {cfg.train.max_steps} steps "
             f"on {trainer.device.type} ({str(trainer.dtype).removeprefix('torch.')})")
        if budgeted and budget is None:  # resumed, only a demo stopped inside the probe still has one to do
            budget = fit_to_budget(trainer, t_start + 60 * budget_minutes - REPORT_SECONDS)
            if budget is not None:
                budget["minutes"] = budget_minutes
                atomic_write_text(budget_path, json.dumps(budget) + "\n")
                _say(f"at {budget['seconds_per_step']:.2f} s/step here, {budget['steps']} of the "
                     f"{budget['config_steps']} steps fit the {budget_minutes:g}-minute budget; training those "
                     f"(--budget-minutes 0 into a new --out trains them all)")
        result = trainer.run()
        if result.interrupted:  # SIGINT/SIGTERM: the run stopped after a step, checkpointed; no report
            hint = f"`felix demo --out {out_dir}` (with the same options) continues it"
            raise RunStopped(stop_message(result, hint), result.interrupted)
    with _Stage("report", seconds):
        report = build_report(trainer.cfg, trainer, result, run_dir, out_dir)
        if budget is not None:
            report["budget"] = budget
    report["wall_time"] = clock.stop()  # every run's into out_dir, this one included
    seconds["total"] = round(clock.elapsed, 2)
    report["stage_seconds"] = seconds  # this run's
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out_dir / "report.md", render_report(report))
    return DemoResult(out_dir, report, seconds)


def build_report(cfg: FelixConfig, trainer: Trainer, result, run_dir: Path, out_dir: Path) -> dict:
    """Figures of the finished run, its loss plot and a few greedy samples."""
    plot = plot_losses(run_dir / "metrics.jsonl", out_dir / "loss.png", title="felix demo: loss",
                       grad_clip=cfg.train.grad_clip)
    rows = read_metrics(run_dir / "metrics.jsonl")
    timed = [r["tok_per_s"] for r in rows if r.get("tok_per_s")]
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    median = (lambda xs: sorted(xs)[len(xs) // 2] if xs else None)  # noqa: E731
    vals = [r for r in rows if r.get("val_loss") is not None]
    checkpoint = latest_checkpoint(run_dir)
    return {
        "params": trainer.params,
        "splice_params": trainer.model.num_splice_params(),
        "tokens_seen": result.tokens,
        "steps": result.steps,
        "tok_per_s": median(timed),
        "mfu": median(mfus),
        "mfu_peak_source": trainer.peak_source,
        "flops_per_token": trainer.flops_per_token,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "val_bpb": vals[-1]["val_bpb"] if vals else None,
        "skipped_steps": result.skipped_steps,
        "grad_norm": grad_norm_summary(rows, cfg.train.grad_clip),
        "device": trainer.device.type,
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "loss_plot": str(plot),
        "checkpoint": str(checkpoint),
        "samples": greedy_samples(checkpoint) if checkpoint else [],
        "model": cfg.model.model_dump(),
    }


def _wall_time_row(r: dict) -> str:
    """This run's seconds by stage; after several runs into the directory, their total first."""
    this = r["stage_seconds"]
    text = f"{this['total']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in this.items() if k != 'total')})"
    if (wall := r.get("wall_time")) and wall["runs"] > 1:  # resumed: this run alone understates the demo's cost
        text = (f"{wall['seconds']:.0f} s over {wall['runs']} runs into this directory (interrupted ones "
                f"included); this run {text}")
    return f"| wall time | {text} |"


def _grad_norm_row(g: dict) -> str:
    clipped = (f"{g['clipped']:,} of {g['steps']:,} steps clipped at {g['clip']:g} "
               f"({100 * g['clipped'] / g['steps']:.1f}%)" if math.isfinite(g["clip"]) else "no clipping")
    return (f"| gradient norm | median {g['median']:.3g} before clipping; {clipped}; largest {g['max']:.3g} "
            f"at step {g['max_step']} |")


def render_report(r: dict) -> str:
    """The report as Markdown."""
    def fmt(v, spec=",.0f"):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "# Felix demo report", "",
        "| figure | value |", "| --- | --- |",
        f"| parameters | {fmt(r['params'])} (SpliceCore {fmt(r['splice_params'])}) |",
        f"| tokens seen | {fmt(r['tokens_seen'])} in {r['steps']} steps |",
        *([f"| time budget | {b['steps']} of the config's {b['config_steps']} steps fit {b['minutes']:g} minutes "
           f"at {b['seconds_per_step']:.2f} s/step (`--budget-minutes 0` into a new `--out` trains them all) |"]
          if (b := r.get("budget")) else []),
        f"| throughput | {fmt(r['tok_per_s'])} tok/s (median step) on {r['device']} {r['dtype']}, "
        f"{r['threads']} threads |",
        f"| MFU | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% of the {r['mfu_peak_source']} |",
        f"| loss | {fmt(r['first_loss'], '.3f')} → {fmt(r['final_loss'], '.3f')} (train) |",
        f"| validation | {fmt(r['val_loss'], '.3f')} nats/token, {fmt(r['val_bpb'], '.3f')} bits/byte |",
        *([_grad_norm_row(g)] if (g := r.get("grad_norm")) else []),
        f"| skipped steps | {r['skipped_steps']} |",
        _wall_time_row(r),
        "", "![loss](loss.png)", "", "## Greedy samples", "",
    ]
    for s in r["samples"]:
        lines += [f"**{s['prompt']!r}** →", "", "```", s["prompt"] + s["completion"], "```", ""]
    lines += [f"Checkpoint: `{r['checkpoint']}`", ""]
    return "\n".join(lines)
