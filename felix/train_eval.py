"""Validation during training: the loss over fixed batches of the val split, and its bits per byte."""

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
def evaluate_val(model: FelixLM, loader: MixLoader, token_bytes: torch.Tensor, batches: int, device: torch.device,
                 dtype: torch.dtype, dist: DistInfo) -> tuple[float, float]:
    """Validation loss (nats/token, every target) and bits per byte over `batches` batches of `loader` (the val
    split), over all ranks; `token_bytes` holds each token id's UTF-8 length. Leaves the model in train mode.

    Bits per byte counts the targets that decode to bytes: a special token (<|endoftext|>) has none, so
    its loss is in neither sum (as nanochat does); counted, it would raise bpb with no bytes to show."""
    model.eval()
    token_bytes = token_bytes.to(device)
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # nats, tokens, byte nats, bytes
    for _ in range(batches):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        losses = cross_entropy(logits, y, reduction="none").double()
        n_bytes = token_bytes[y.reshape(-1)]
        totals += torch.stack([losses.sum(), losses.new_tensor(losses.numel()),
                               (losses * (n_bytes > 0)).sum(), n_bytes.sum().double()])
    model.train()
    nats, n_tok, byte_nats, n_bytes = all_reduce_mean(totals, dist).tolist()
    return nats / n_tok, byte_nats / (math.log(2) * n_bytes)
