"""The training objective: next-token cross-entropy, plus the QUAIL hinge when configured. It is the
module that DDP and torch.compile wrap, so both terms share one forward pass and one gradient sync."""

from __future__ import annotations

import torch
from torch import nn

from felix.config import QuailConfig
from felix.model import FelixLM, linear_cross_entropy
from felix.quail import Whitelist, logit_noise, margin_from_noise, margin_hinge, margin_shift
from felix.quantize import fake_quantize_model, fake_quantized


class TrainingObjective(nn.Module):
    """forward(x, y, margin) -> (total loss, cross-entropy, hinge, whitelisted positions).

    The count of positions is a tensor, as is every denominator: reading one as a Python number would
    synchronize with the GPU and break a compiled graph.
    """

    def __init__(self, model: FelixLM, quail: QuailConfig | None = None, whitelist: Whitelist | None = None):
        super().__init__()
        self.model = model
        self.quail = quail if quail is not None and quail.enabled else None
        self.whitelist = whitelist

    def forward(self, x: torch.Tensor, y: torch.Tensor, margin: float = 0.0,
                whitelisted: torch.Tensor | None = None):
        """`whitelisted`: with normalize "whitelisted", what this micro-batch's hinge sum is divided by: the
        step's whitelisted positions divided by its micro-batches and ranks, so that the trainer's and DDP's
        averaging of micro-batches gives the mean over every whitelisted position of the step (positive
        whenever the step has any). Default: this micro-batch's own count."""
        quail = self.quail is not None and self.whitelist is not None
        mask = self.whitelist.mask(y) if quail else None
        zq = None
        if quail and self.quail.ste:
            # The hinge sees the deployment-quantized model (head included); gradients reach the full
            # weights unchanged. It runs first: leaving the context touches the parameters, which must
            # happen before the full-precision pass saves them for backward. Without activation
            # checkpointing: its recomputation in backward runs after the context has gone, on the
            # full-precision weights, and would differentiate the wrong forward.
            checkpointing, self.model.activation_checkpointing = self.model.activation_checkpointing, False
            try:
                with fake_quantized(self.model, self.quail.format, ste=True):
                    zq = self._hinge_logits(self.model.final_hidden(x)[mask])
            finally:
                self.model.activation_checkpointing = checkpointing
        h = self.model.final_hidden(x)
        # as FelixLM(x, targets=y) does: the model's chunk (None: this device's; felix.memory sets its target's)
        ce = linear_cross_entropy(h, self.model.tok_emb.weight, y, chunk_rows=self.model.loss_chunk_rows)
        if not quail:
            return ce, ce.detach(), ce.new_zeros(()), torch.zeros((), dtype=torch.long, device=y.device)
        z = zq if zq is not None else self._hinge_logits(h[mask])
        count = mask.sum()
        if self.quail.normalize == "all":
            # Cross-entropy averages over the targets it does not ignore (-100): divide by the same count.
            denominator = (y != -100).sum().clamp(min=1)
        else:
            denominator = whitelisted if whitelisted is not None else count.clamp(min=1)
        hinge = margin_hinge(z, y[mask], margin, self.quail.gamma, denominator, self.quail.protect_only)
        return ce + hinge, ce.detach(), hinge.detach(), count

    def _hinge_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head at the whitelisted positions in fp32 whatever the autocast: the margin it is held to is
        calibrated in fp32, and bf16's rounding of the logits (0.06 at |z| ~ 10) is a sizeable share of it. A few rows
        of logits, so fp32 costs next to nothing."""
        with torch.autocast(h.device.type, enabled=False):
            return self.model.lm_head(h.float())


@torch.no_grad()
def calibrate_margin(model: FelixLM, batches: list[tuple[torch.Tensor, torch.Tensor]], whitelist: Whitelist,
                     fmt: str, percentile: float, method: str = "logit_noise") -> float:
    """QUAIL's margin from measured noise under deployment format `fmt`, at whitelisted positions of
    `batches`: `logit_noise` doubles the `percentile` of |z_full − z_quantized| over every vocabulary
    entry; `margin_shift` takes the `percentile` of |margin_full − margin_quantized| (the target's lead
    over its strongest competitor, which is what the hinge protects).

    When the batches hold no whitelisted target at all (rare tokens, small batches), every position whose
    target is not ignored (-100) is used instead: the noise comes from the weights, so it differs little
    between positions.
    """
    was_training = model.training
    model.eval()
    quant = fake_quantize_model(model, fmt)
    full = [(model.final_hidden(x), quant.final_hidden(x), whitelist.mask(y)) for x, y in batches]
    model.train(was_training)
    if not any(mask.any() for _, _, mask in full):  # every target cross-entropy counts (-100: ignored)
        full = [(h, hq, y != -100) for (h, hq, _), (_, y) in zip(full, batches, strict=True)]
    if method == "margin_shift":
        shifts = [margin_shift(model.lm_head(h[mask]), quant.lm_head(hq[mask]), y[mask])
                  for (h, hq, mask), (_, y) in zip(full, batches, strict=True) if mask.any()]
        # margin_from_noise doubles a per-logit noise; a margin shift already is the whole change.
        return margin_from_noise(torch.cat(shifts) if shifts else torch.empty(0), percentile) / 2
    noise = [logit_noise(model.lm_head(h[mask]), quant.lm_head(hq[mask])) for h, hq, mask in full if mask.any()]
    return margin_from_noise(torch.cat(noise) if noise else torch.empty(0), percentile)
