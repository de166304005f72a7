"""Validation during training: the loss over a fixed set of val windows, and its bits per byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from felix.dataloader import MixLoader
from felix.device import autocast
from felix.distributed import DistInfo, all_reduce_mean
from felix.model import FelixLM


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate_val(model: FelixLM, stream: MixLoader, token_bytes: torch.Tensor, sequences: int, micro_batch: int,
                 device: torch.device, dtype: torch.dtype, dist: DistInfo) -> tuple[float, float]:
    """Validation loss (nats/token, every target) and bits per byte over the first `sequences` windows of `stream`
    (the val split, one window per batch, the same on every rank), each rank reading every world_size-th in
    batches of up to `micro_batch`: the same windows whatever the micro-batch size and world size, so a resume
    that changes either evaluates what the run evaluated before. `token_bytes` holds each token id's UTF-8
    length. Leaves the model in train mode.

    Bits per byte counts the targets that decode to bytes: a special token (<|endoftext|>) has none, so
    its loss is in neither sum (as nanochat does); counted, it would raise bpb with no bytes to show."""
    if stream.batch_size != 1 or stream.world_size != 1:
        raise ValueError("evaluate_val reads a stream of single windows, the same on every rank")
    model.eval()
    token_bytes = token_bytes.to(device)
    # float64 sums, but on MPS, which has no float64 (float32 sums of at most millions of nats lose ~1e-7)
    acc = torch.float32 if device.type == "mps" else torch.float64
    totals = torch.zeros(4, device=device, dtype=acc)  # nats, tokens, byte nats, bytes
    mine = range(dist.rank, sequences, dist.world_size)
    for first in range(0, len(mine), micro_batch):
        rows = []
        for g in mine[first: first + micro_batch]:
            stream.advance(g - stream.sample)  # the other ranks' windows, not read
            rows.append(stream.next_batch())
        x, y = (torch.cat(t).to(device) for t in zip(*rows, strict=True))
        with autocast(device, dtype):
            logits = model(x)
        losses = cross_entropy(logits, y, reduction="none").to(acc)
        n_bytes = token_bytes[y.reshape(-1)]
        totals += torch.stack([losses.sum(), losses.new_tensor(losses.numel()),
                               (losses * (n_bytes > 0)).sum(), n_bytes.sum().to(acc)])
    model.train()
    # a sum over ranks (a mean, times world_size, which the ratios cancel), however many windows each read
    nats, n_tok, byte_nats, n_bytes = all_reduce_mean(totals, dist).tolist()
    return nats / n_tok, byte_nats / (math.log(2) * n_bytes)
