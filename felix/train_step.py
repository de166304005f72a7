"""One optimizer step's work before its update: QUAIL's hinge normalization, the gradients of the accumulation
window, and the judgement whether the update may be applied (a bad step is skipped: a non-finite loss or
gradient, a loss spike; an fp16 overflow only backs off the loss scale). QUAIL's margin: felix.train_quail."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from felix.config import QuailConfig, TrainConfig
from felix.device import autocast
from felix.distributed import DistInfo, all_reduce_mean
from felix.model import FelixLM
from felix.quail import Whitelist, fake_quant_failure
from felix.train_state import TrainState

Batch = tuple[torch.Tensor, torch.Tensor]


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
