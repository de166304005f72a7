"""QUAIL, adapted to refusal preservation: a hinge on the logit margin of whitelisted target tokens, so
that low-probability refusal and schema tokens keep a lead that 4-bit quantization noise cannot erase.

    L = γ · mean over positions whose target t is whitelisted of max(0, m − (z_t − max_{j≠t} z_j))

The margin m is calibrated from measured quantization noise (`calibrate_margin`) under the deployment
format: twice a high percentile of |z_full − z_quantized| at whitelisted positions (`logit_noise`), or a
high percentile of the margin's own shift |Δ(z_t − max_{j≠t} z_j)| there (`margin_shift`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from felix.errors import FelixError
from felix.quant_formats import FORMATS, QuantError
from felix.quantize import quantizable_params
from felix.tokenizer import FelixTokenizer

# torch.quantile refuses inputs longer than this
QUANTILE_MAX = 2**24
SHOWN_TENSORS = 3  # a diagnosis names this many tensors, then counts the rest


@dataclass(frozen=True)
class Whitelist:
    """Token ids whose margins QUAIL protects, with the strings they came from."""

    ids: tuple[int, ...]
    strings: tuple[str, ...]

    def mask(self, targets: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the positions whose target is whitelisted."""
        return torch.isin(targets, torch.tensor(self.ids, dtype=targets.dtype, device=targets.device))


def resolve_whitelist(tokenizer: FelixTokenizer, strings: list[str], source: str = "quail.tokens") -> Whitelist:
    """Map configured strings to token ids; each must be exactly one token of this vocabulary.

    A string that the tokenizer splits (or that is empty) is a configuration error, reported with how
    it actually tokenizes, because protecting a different token than the one meant is silent failure.
    """
    if not strings:
        raise FelixError(f"{source}: the whitelist is empty")
    ids, problems = [], []
    for s in strings:
        if s in tokenizer.special_ids:
            ids.append(tokenizer.special_ids[s])
            continue
        pieces = tokenizer.encode(s)
        if len(pieces) != 1:
            shown = [tokenizer.decode([p]) for p in pieces]
            problems.append(f"{s!r} is {len(pieces)} tokens {shown}, not one")
        else:
            ids.append(pieces[0])
    if problems:
        raise FelixError(f"{source}: " + "; ".join(problems) + f" (tokenizer {tokenizer.path})")
    return Whitelist(tuple(dict.fromkeys(ids)), tuple(strings))


def _glued(piece: bytes, token: bytes) -> bool:
    """Whether `piece` spells `token` followed by punctuation or whitespace (`{"` for `{`), not by a letter or digit
    (`In` for `I` is another word)."""
    if len(piece) <= len(token) or not piece.startswith(token):
        return False
    nxt = piece[len(token)]
    return nxt < 0x80 and not (chr(nxt).isalnum() or chr(nxt) == "_")


def unprotected_variants(tokenizer: FelixTokenizer, whitelist: Whitelist, targets: torch.Tensor) -> str | None:
    """What to say when `targets` (a sample of the training data's target ids) mostly spell a whitelisted token glued
    to what follows it (`{"` where `{` is listed): byte-level BPE merges schema tokens with their neighbours, and
    QUAIL protects only the ids it is given, so most of the positions meant go unprotected. None when none does."""
    counts = torch.bincount(targets.reshape(-1).long().cpu(), minlength=tokenizer.vocab_size).tolist()
    present = {v: tokenizer.token_bytes(v) for v, n in enumerate(counts) if n}
    notes = []
    for text in dict.fromkeys(whitelist.strings):
        if text in tokenizer.special_ids:
            continue
        (tid,) = tokenizer.encode(text)  # one token: resolve_whitelist made sure
        token = tokenizer.token_bytes(tid)
        glued = {v: counts[v] for v, piece in present.items()
                 if v not in tokenizer.special_ids.values() and _glued(piece, token)}
        if sum(glued.values()) > counts[tid]:
            top = sorted(glued.items(), key=lambda kv: -kv[1])[:5]
            shown = ", ".join(f"{tokenizer.decode([v])!r} {n}" for v, n in top)
            notes.append(f"{text!r} is the target {counts[tid]} times in the sample, tokens beginning with it "
                         f"{sum(glued.values())} times ({shown})")
    if not notes:
        return None
    return ("; ".join(notes) + ": QUAIL protects only the listed tokens; add those variants to quail.tokens if "
            "they are what you mean to keep")


def logit_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """z_target − max_{j≠target} z_j per position, in fp32."""
    z = logits.float()
    target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return target - others.max(-1).values


def margin_hinge(logits: torch.Tensor, targets: torch.Tensor, margin: float, gamma: float,
                 denominator: int | torch.Tensor | None = None, protect_only: bool = False) -> torch.Tensor:
    """γ · Σ max(0, m − margin) over the given positions, divided by `denominator` (default: their count).

    `denominator` = every target position of the batch weighs a whitelisted position like one
    cross-entropy token instead of like the whole batch. `protect_only` drops positions where the target
    is not already the model's top-1 (margin ≤ 0): the hinge then keeps a lead the data taught and cannot
    create one, which is how the plain hinge collapses into whitelisting everything. The lead is read from
    `logits` themselves: for the straight-through hinge those are the deployed (quantized) model's, a choice
    measured in EXP-40b (gating on the full model's lead instead lost 21% of refusals on one of two seeds).
    """
    if targets.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32)
    lead = logit_margin(logits, targets)
    loss = torch.clamp(margin - lead, min=0.0)
    if protect_only:
        loss = loss * (lead.detach() > 0)
    return gamma * loss.sum() / (targets.numel() if denominator is None else denominator)


def quail_hinge(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, margin: float,
                gamma: float) -> tuple[torch.Tensor, int]:
    """The hinge over the masked positions of full logits, and how many positions there were."""
    return margin_hinge(logits[mask], targets[mask], margin, gamma), int(mask.sum())


@torch.no_grad()
def logit_noise(full_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """|z_full − z_quantized| over every vocabulary entry of the given positions (flattened)."""
    return (full_logits.float() - quant_logits.float()).abs().flatten()


@torch.no_grad()
def margin_shift(full_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|margin_full − margin_quantized| per position: how far quantization moves the quantity the hinge
    protects (not every vocabulary entry's logit, most of which never compete)."""
    return (logit_margin(full_logits, targets) - logit_margin(quant_logits, targets)).abs()


def margin_from_noise(noise: torch.Tensor, percentile: float) -> float:
    """The margin that quantization noise of this size cannot flip: twice the noise percentile, since
    the target logit can fall by that much while a competitor rises by as much."""
    if noise.numel() == 0:
        raise FelixError("cannot calibrate the QUAIL margin: no whitelisted positions in the calibration data")
    flat = noise.float().flatten()
    if flat.numel() > QUANTILE_MAX:  # torch.quantile's limit: an even stride over all positions, not the first
        flat = flat[:: math.ceil(flat.numel() / QUANTILE_MAX)]
    return 2.0 * float(torch.quantile(flat, percentile / 100.0))


def _tensor_list(names: list[str]) -> str:
    more = len(names) - SHOWN_TENSORS
    return ", ".join(names[:SHOWN_TENSORS]) + (f" and {more} more" if more > 0 else "")


@torch.no_grad()
def fake_quant_failure(model: nn.Module, fmt: str) -> str | None:
    """Why the straight-through (quail.ste) forward under `fmt` went non-finite, read from the weights: some
    are NaN/inf already, or finite ones overflow a block scale (`fake_quant`'s strict check). None: neither.

    For bad steps only: it quantizes every weight and reads the verdicts back from the device, which the
    unchecked training path (`QuantFormat.fake_quant_ste`) must not do on every step."""
    params = dict(model.named_parameters())
    broken = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if broken:
        return f"the weights themselves are NaN/inf in {_tensor_list(broken)} (not a {fmt} block scale overflow)"
    overflowed = []
    for name, enc in quantizable_params(model, fmt):
        try:
            FORMATS[enc].fake_quant(params[name], strict=True)
        except QuantError:
            overflowed.append(name)
    if not overflowed:
        return None
    peak = max(float(params[name].abs().max()) for name in overflowed)
    return (f"quail.ste's fake quantization ({fmt}) overflows a block scale in {_tensor_list(overflowed)} (|weight| "
            f"up to {peak:.4g}): the weights grew past what {fmt}'s scale type holds; lower train.lr, check "
            f"train.weight_decay, or train with a quail.format whose scale is wider (nf4's is fp32)")
