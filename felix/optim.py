"""AdamW with decoupled weight decay on matrices only (not on norms or scalars)."""

from __future__ import annotations

import torch
from torch import nn

from felix.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW; weight decay on matrices (embeddings and SpliceCore A/B included), not on norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel exists for CUDA/ROCm, MPS and CPU (where it is ~5x faster than foreach).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
