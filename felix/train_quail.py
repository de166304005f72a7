"""QUAIL's margin over a training run: calibrated on fixed val windows when due (or fixed by quail.margin),
recorded with what it came from so that a resume under other settings does not train on with it, and the
warnings a run gives once (no whitelisted target to calibrate on, or for the hinge to act on)."""

from __future__ import annotations

import warnings
from functools import partial

import torch

from felix.config import FelixConfig, QuailConfig
from felix.dataloader import MixLoader
from felix.distributed import DistInfo, all_reduce_mean
from felix.errors import FelixError
from felix.metrics import Progress
from felix.model import FelixLM
from felix.objective import calibrate_margin
from felix.quail import Whitelist, resolve_whitelist, unprotected_variants
from felix.train_data import TrainData
from felix.train_state import TrainState

# steps without a single whitelisted target after which a run says QUAIL's hinge has not fired (or at its end)
UNSEEN_STEPS = 100
# training windows whose targets are checked for whitelisted tokens BPE glued to what follows (`{"` for `{`)
VARIANT_SAMPLE_WINDOWS = 64


def calibrate_on_val(model: FelixLM, stream: MixLoader, whitelist: Whitelist, q: QuailConfig, micro_batch: int,
                     dist: DistInfo, device: torch.device) -> tuple[float, int]:
    """QUAIL's margin measured on the first quail.calibration_sequences windows of `stream` (the val split as single
    windows, `TrainData.val_stream`) in batches of up to `micro_batch`: the same sample whatever the micro-batch size
    and world size. Also the whitelisted targets among them (0: the margin was measured at every position)."""
    if stream.batch_size != 1 or stream.world_size != 1:
        raise ValueError("calibrate_on_val reads a stream of single windows, the same on every rank")
    windows = [stream.next_batch() for _ in range(q.calibration_sequences)]
    batches = [tuple(torch.cat(t).to(device) for t in zip(*windows[i: i + micro_batch], strict=True))
               for i in range(0, len(windows), micro_batch)]
    # In fp32, not the run's autocast: bf16's rounding of the logits is noise of its own, and the margin is to
    # cover the deployment format's alone.
    margin = calibrate_margin(model, batches, whitelist, q.format, q.percentile, q.calibration)
    count = sum(int(whitelist.mask(y).sum()) for _, y in batches)
    # Every rank measures every window (a percentile does not sum over ranks); the mean keeps them identical.
    return all_reduce_mean(torch.tensor(margin, device=device), dist).item(), count


# what a calibrated margin's value depends on (margin_source's keys but "every", the schedule)
_MEASURED = ("format", "percentile", "calibration", "tokens", "sequences")


def margin_source(q: QuailConfig) -> dict:
    """What QUAIL's margin comes from under `q` (kept in TrainState): the fixed quail.margin, or the settings
    calibration measures it under and its schedule."""
    if q.margin is not None:
        return {"margin": q.margin}
    return {"format": q.format, "percentile": q.percentile, "calibration": q.calibration, "tokens": sorted(q.tokens),
            "sequences": q.calibration_sequences, "every": q.calibrate_every}


def complete_margin_source(state: TrainState, q: QuailConfig, world_size: int) -> None:
    """Fill in a restored calibrated margin's source recorded before felix recorded its sample and schedule: those of
    the checkpoint's quail config `q`, calibration_batches micro-batches on each of its `world_size` ranks."""
    if (source := state.quail_margin_source) is not None and "margin" not in source:
        source.setdefault("sequences", q.calibration_sequences * world_size)
        source.setdefault("every", q.calibrate_every)


def _describe_source(source: dict | None) -> str:
    if source is None:
        return "of unrecorded origin (a checkpoint from before felix recorded it)"
    if "margin" in source:
        return f"fixed (quail.margin={source['margin']:g})"
    return (f"calibrated under {source['format']} at percentile {source['percentile']:g} by {source['calibration']}"
            f", tokens {source['tokens']}, on {source.get('sequences', '?')} val windows")


def _schedule(every: int) -> str:
    return f"every {every} steps" if every else "once, at the start"


def reconcile_margin(state: TrainState, q: QuailConfig) -> str | None:
    """Fit the restored state's QUAIL margin to this run's quail settings; returns the warning to give, if any.

    A fixed quail.margin always wins. A calibrated one from other settings (or of unrecorded origin) is dropped, so
    the first step recalibrates; from the same settings it is kept (a resume stays bit-exact). Another
    quail.calibrate_every alone keeps it and calibrates next at its next multiple, as a run so configured from the
    start would; 0 calibrates no more."""
    new, old, margin = margin_source(q), state.quail_margin_source, state.quail_margin
    if q.margin is not None:
        state.quail_margin, state.quail_margin_source = q.margin, new
        if margin is None or old == new or (old is None and margin == q.margin):
            return None
        return (f"the checkpoint trained with QUAIL margin {margin:.4g}, {_describe_source(old)}; this run's "
                f"quail.margin={q.margin:g} applies from step {state.step}")
    if margin is None or old == new:
        return None
    if old is not None and all(old.get(k) == new[k] for k in _MEASURED):
        state.quail_margin_source = new
        every, step = q.calibrate_every, state.step
        after = f"the next calibration at step {-(-step // every) * every}" if every else "no more calibrations"
        return (f"the checkpoint calibrated its QUAIL margin {_schedule(old.get('every', every))}, this run "
                f"{_schedule(every)} (quail.calibrate_every): its margin {margin:.4g} is kept, {after}")
    keep = (f"; quail.calibration_sequences={old['sequences']} keeps the checkpoint's sample"
            if old is not None and old.get("sequences") not in (None, new["sequences"]) else "")
    state.quail_margin = state.quail_margin_source = None  # TrainQuail.calibrate_if_due measures it at once
    return (f"the checkpoint trained with QUAIL margin {margin:.4g}, {_describe_source(old)}; this run calibrates "
            f"under {q.format} at percentile {q.percentile:g} by {q.calibration}, tokens {sorted(q.tokens)}, on "
            f"{q.calibration_sequences} val windows: recalibrating at step {state.step}{keep}")


class TrainQuail:
    """QUAIL in a running trainer: the whitelist, the margin calibrated when due, the last step's hinge terms (its
    metrics row's quail_* fields), and the warnings given once per run."""

    def __init__(self, cfg: FelixConfig, data: TrainData, dist: DistInfo, device: torch.device):
        self.q, self.micro_batch, self.dist, self.device = cfg.quail, cfg.train.micro_batch_size, dist, device
        self.whitelist = resolve_whitelist(data.tokenizer, cfg.quail.tokens)
        if dist.is_main and (note := unprotected_variants(data.tokenizer, self.whitelist,
                                                          data.sample_targets(cfg, VARIANT_SAMPLE_WINDOWS))):
            warnings.warn(f"quail.tokens: in the first {VARIANT_SAMPLE_WINDOWS} training windows, {note}",
                          stacklevel=4)  # Trainer()'s caller
        if cfg.quail.ste and dist.enabled:
            raise FelixError("quail.ste (fake-quantized hinge) is single-process only; run without torchrun")
        self._val_stream = partial(data.val_stream, cfg)
        self.row: dict = {}
        self._said: set[str] = set()

    def calibrate_if_due(self, state: TrainState, model: FelixLM) -> None:
        """Measure state's margin now when there is none yet or quail.calibrate_every says so (not with a fixed one)."""
        q = self.q
        if q.margin is not None:
            return
        if state.quail_margin is None or (q.calibrate_every and state.step % q.calibrate_every == 0):
            state.quail_margin, count = calibrate_on_val(model, self._val_stream(), self.whitelist, q,
                                                         self.micro_batch, self.dist, self.device)
            state.quail_margin_source = margin_source(q)
            if not count and "calibration" not in self._said and self.dist.is_main:
                self._said.add("calibration")
                warnings.warn(f"quail: the {q.calibration_sequences} val window(s) calibration measures "
                              f"(quail.calibration_sequences) hold no whitelisted target (quail.tokens "
                              f"{list(self.whitelist.strings)}): the margin at step {state.step} was measured "
                              f"at every target position instead", stacklevel=2)

    def record(self, hinge: torch.Tensor, positions: torch.Tensor, margin: float) -> None:
        """The step's row fields from this rank's mean hinge and its count of whitelisted positions."""
        # each rank counted its own slice of the batch: the step's count is the sum over ranks
        count = all_reduce_mean(positions, self.dist).item()
        self.row = {"quail_loss": all_reduce_mean(hinge, self.dist).item(), "quail_margin": margin,
                    "quail_positions": round(count * self.dist.world_size)}

    def check_fires(self, progress: Progress, steps: int, final: bool) -> None:
        """Say once when `steps` steps of this run (at least UNSEEN_STEPS, or all at its end) had no whitelisted
        target: the hinge never fired, which a whitelist absent from the training data looks like."""
        if "unseen" in self._said:
            return
        if self.row["quail_positions"] > 0:
            self._said.add("unseen")  # it fires: nothing to say
        elif steps >= UNSEEN_STEPS or final:
            self._said.add("unseen")
            progress.write(f"warning: quail: none of the {steps} training steps so far had a whitelisted target "
                           f"(quail.tokens {list(self.whitelist.strings)}): the hinge never fired "
                           f"(quail_positions 0); are these tokens in the training data?")
