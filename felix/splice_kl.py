"""`kl_train`: KL-penalized corrective training of the chosen layers' SpliceCore `a` and `b`.

Cross-entropy on the target, plus replay of earlier edits, plus kl_weight · KL(pre-edit ‖ edited) on the
request's neutral prompts and a few preservation windows; it stops as soon as every target token wins by
the margin. The brief's method; `closed_form_a` is the default (docs/splicing.md, EXP-46b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from felix.errors import FelixError
from felix.model import FelixLM
from felix.splice_config import EditConfig, EditContext
from felix.splice_examples import (
    Example,
    batch_examples,
    edit_layers,
    grads_only_for,
    kl_rows,
    last_logprobs,
    model_device,
    next_token_logprobs,
    splice_names,
    targets_win,
)


def _kl_term(model: FelixLM, base_lp: torch.Tensor, prompts: list[list[int]], preserve: torch.Tensor,
             base_pres: torch.Tensor | None) -> torch.Tensor:
    parts = []
    if prompts:
        parts.append(kl_rows(base_lp, next_token_logprobs(model, prompts)).mean())
    if base_pres is not None:
        lp = torch.log_softmax(model(preserve.to(model_device(model))).float(), -1)
        parts.append(kl_rows(base_pres, lp).mean())
    return sum(parts) / max(len(parts), 1) if parts else torch.zeros(())


def kl_train(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext,
             cfg: EditConfig) -> dict[str, torch.Tensor]:
    """KL-penalized corrective training of the SpliceCore `a`/`b` of `layers`; returns the new tensors."""
    if cfg.train not in ("ab", "b") or cfg.optimizer not in ("adam", "sgd"):
        raise FelixError(f"edit config: train must be ab or b and optimizer adam or sgd, got {cfg.train!r}, "
                         f"{cfg.optimizer!r}")
    names = splice_names(edit_layers(model, layers), tuple(cfg.train))
    before = {k: v for k, v in model.splice_state().items() if k in names}
    params = dict(model.named_parameters())
    train = [params[n] for n in names]
    with torch.no_grad():
        base_lp = last_logprobs(model, ctx.neutral) if ctx.neutral else None
        # a few short windows: the KL only has to see the model's typical behaviour, and every step pays for it
        pres = ctx.preserve[: cfg.kl_windows, :64]
        base_pres = torch.log_softmax(model(pres.to(model_device(model))).float(), -1) if pres.numel() else None
    gen = torch.Generator().manual_seed(len(ctx.prior))
    opt = torch.optim.Adam(train, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(train, lr=cfg.lr)
    try:
        with grads_only_for(model, train), torch.enable_grad():  # a caller's no_grad would leave nothing to train
            for _ in range(cfg.steps):
                # A fresh random subset of earlier edits each step: over the steps every one gets replayed
                # without the batch growing with the stack.
                pick = torch.randperm(len(ctx.prior), generator=gen)[: cfg.max_replay].tolist() if cfg.replay else []
                prior = [ctx.prior[i] for i in sorted(pick)]
                idx, labels, _ = batch_examples([ex, *prior], model_device(model))
                logits = model(idx)
                lf = logits.float()
                loss = F.cross_entropy(lf[:1].flatten(0, 1), labels[:1].flatten(), ignore_index=-100)
                if prior:  # replayed edits: their own mean, so one edit weighs as much as all the replayed
                    loss = loss + F.cross_entropy(lf[1:].flatten(0, 1), labels[1:].flatten(), ignore_index=-100)
                loss = loss + cfg.kl_weight * _kl_term(model, base_lp, ctx.neutral, pres, base_pres)
                if targets_win(logits, labels, cfg.margin):  # the edit and every replayed edit
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        after = {n: params[n].detach().clone() for n in names}
    finally:
        model.load_splice_state(before, strict=False)
    return after
