"""One optimizer step's work before its update: QUAIL's margin and hinge normalization, the gradients of the
accumulation window, and the judgement whether the update may be applied (a bad step is skipped: a
non-finite loss or gradient, a loss spike; an fp16 overflow only backs off the loss scale)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from felix.config import QuailConfig, TrainConfig
from felix.dataloader import MixLoader
from felix.device import autocast
from felix.distributed import DistInfo, all_reduce_mean
from felix.model import FelixLM
from felix.objective import calibrate_margin
from felix.quail import Whitelist, fake_quant_failure
from felix.train_state import TrainState

Batch = tuple[torch.Tensor, torch.Tensor]


def calibrated_margin(model: FelixLM, stream: MixLoader, whitelist: Whitelist, q: QuailConfig, micro_batch: int,
                      dist: DistInfo, device: torch.device) -> tuple[float, int]:
    """QUAIL's margin from the quantization noise measured now on the first quail.calibration_sequences windows of
    `stream` (the val split as single windows, `TrainData.val_stream`), read in batches of up to `micro_batch`: the
    same sample whatever the micro-batch size and world size. Also the whitelisted targets among them (0: the margin
    was measured at every position)."""
    if stream.batch_size != 1 or stream.world_size != 1:
        raise ValueError("calibrated_margin reads a stream of single windows, the same on every rank")
    windows = [stream.next_batch() for _ in range(q.calibration_sequences)]
    batches = [tuple(torch.cat(t).to(device) for t in zip(*windows[i: i + micro_batch], strict=True))
               for i in range(0, len(windows), micro_batch)]
    # In fp32, not the run's autocast: bf16's rounding of the logits is noise of its own (it nearly
    # doubled q8_0's measured shift), and the margin is to cover the deployment format's alone.
    margin = calibrate_margin(model, batches, whitelist, q.format, q.percentile, q.calibration)
    count = sum(int(whitelist.mask(y).sum()) for _, y in batches)
    # Every rank measures every window: a percentile needs all of their noise, which does not sum over ranks as
    # evaluate_val's losses do. The mean over ranks of (nearly) one value keeps the objective identical everywhere.
    return all_reduce_mean(torch.tensor(margin, device=device), dist).item(), count


# what a calibrated margin's value depends on (margin_source's keys but "every", the schedule)
_MEASURED = ("format", "percentile", "calibration", "tokens", "sequences")


def margin_source(q: QuailConfig) -> dict:
    """What QUAIL's margin comes from under `q`: the fixed quail.margin, or the settings calibration measures it
    under and its schedule (kept in TrainState, so that a resume under other settings does not train on with
    another's margin)."""
    if q.margin is not None:
        return {"margin": q.margin}
    return {"format": q.format, "percentile": q.percentile, "calibration": q.calibration, "tokens": sorted(q.tokens),
            "sequences": q.calibration_sequences, "every": q.calibrate_every}


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

    A fixed quail.margin always wins. A calibrated one measured under other settings (or of unrecorded origin) is
    dropped, so the first step recalibrates it. Same settings: kept exactly, and a resume stays bit-exact. Another
    quail.calibrate_every alone keeps it: the schedule takes effect at once, the next calibration at its next
    multiple, the step a run configured so from its start calibrates at (so no state says when the last was, and a
    later resume under it stays bit-exact); 0 calibrates no more, the margin measured at the start being kept."""
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
    state.quail_margin = state.quail_margin_source = None  # _maybe_calibrate measures it at once
    return (f"the checkpoint trained with QUAIL margin {margin:.4g}, {_describe_source(old)}; this run calibrates "
            f"under {q.format} at percentile {q.percentile:g} by {q.calibration}, tokens {sorted(q.tokens)}, on "
            f"{q.calibration_sequences} val windows: recalibrating at step {state.step}{keep}")


def whitelisted_share(batches: list[Batch], whitelist: Whitelist, dist: DistInfo, device: torch.device) -> torch.Tensor:
    """With quail.normalize "whitelisted": the step's whitelisted targets (all micro-batches, all ranks)
    over micro-batches x ranks, each micro-batch's hinge denominator. Per-micro-batch counts would
    weigh a position by how many others shared its micro-batch (one alone weighed as much as 100)."""
    count = sum(int(whitelist.mask(y).sum()) for _, y in batches)
    total = all_reduce_mean(torch.tensor(float(count), device=device), dist) * dist.world_size
    # A step without whitelisted targets has no hinge terms to divide; 1 keeps the division finite.
    return total.clamp(min=1) / (len(batches) * dist.world_size)


def accumulate_gradients(fwd_model: nn.Module, batches: list[Batch], margin: float, whitelisted: torch.Tensor | None,
                         scaler: torch.amp.GradScaler | None, dist: DistInfo, device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over the step's micro-batches, each loss over their count (under DDP the gradients
    sync on the last alone). Returns this rank's sums of cross-entropy, hinge and whitelisted positions."""
    loss_sum = torch.zeros((), device=device)
    hinge_sum = torch.zeros((), device=device)
    positions = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro == len(batches) - 1
        sync = nullcontext() if last or not dist.enabled else fwd_model.no_sync()
        with sync:
            with autocast(device, dtype):
                total, ce, hinge, n = fwd_model(x, y, margin, whitelisted)
            total = total / len(batches)
            (scaler.scale(total) if scaler is not None else total).backward()
        loss_sum += ce
        hinge_sum += hinge
        positions += n
    return loss_sum, hinge_sum, positions


def skip_reason(loss: float, grad_norm: float, state: TrainState, tc: TrainConfig, q: QuailConfig,
                scaler: torch.amp.GradScaler | None, model: FelixLM) -> tuple[str, bool]:
    """Why this step's update must not be applied ("" when it may), and whether that is an fp16 overflow
    alone (the loss scale backs off; not a bad step)."""
    reason, overflow = "", False
    if scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm):
        # The scaled gradients overflowed fp16: the loss scale halves and the step is skipped, as
        # GradScaler does. Not a bad step unless the scale has fallen below 1 (real inf gradients).
        scale = scaler.get_scale()
        overflow = scale >= 1.0
        reason = f"fp16 gradients overflowed at loss scale {scale:g}"
    elif not math.isfinite(loss) or not math.isfinite(grad_norm):
        reason = f"non-finite loss/grad ({loss}, {grad_norm})"
    elif (tc.spike_factor > 0 and state.loss_ema is not None and state.step >= 2 * tc.warmup_steps
          and loss > tc.spike_factor * state.loss_ema):
        reason = f"loss spike {loss:.3f} > {tc.spike_factor} x mean {state.loss_ema:.3f}"
    # the STE forward is unchecked: find out why only once a step has gone non-finite
    if q.enabled and q.ste and not math.isfinite(loss + grad_norm) and (why := fake_quant_failure(model, q.format)):
        reason += f"; {why}"
        overflow = False  # a bad step, not fp16's: halving the loss scale 17 times would not cure it
    return reason, overflow
