"""The settings of an edit (`EditConfig`: method, search, protection, budget) and what a method is given
besides the request (`EditContext`: preservation text, neutral prompts, the edits already applied)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from felix.splice_examples import Example

if TYPE_CHECKING:
    from felix.splice_covariance import InputCovariances
    from felix.splice_pins import TextPins


@dataclass
class EditConfig:
    """Knobs of the methods and of the budget. Defaults are the measured ones (docs/splicing.md)."""

    method: str = "closed_form_a"  # EXP-46b: 9 of 12 tuning edits within budget, kl_train 1 of 12
    layers: list[int] | None = None  # None: the diagnosis picks them
    steps: int = 20
    lr: float = 1e-2  # at demo scale 1e-3 (and so the brief's 1e-4) never reaches the target in 20 steps
    kl_weight: float = 0.3
    replay: bool = True  # keep earlier edits in the loss (retention)
    max_replay: int = 16
    kl_windows: int = 4  # preservation windows (64 tokens each) in the KL term, besides the neutral prompts
    margin: float = 1.0  # stop early once every target token wins by this many nats
    # Which SpliceCore tensors kl_train moves, and how. "b" + "sgd" aims the update: b's gradient is
    # (output error) x (the edit's keys a.u), so plain gradient steps only write along the edit's keys,
    # where Adam's per-coordinate normalization moves every entry by about lr (EXP-46).
    train: str = "ab"  # "ab" | "b"
    optimizer: str = "adam"  # "adam" | "sgd"
    # closed form
    protect: str = "ridge"  # "ridge" (MEMIT) or "nullspace" (AlphaEdit)
    ridge: float = 1.0  # weight of the preserved-key covariance
    prior_weight: float = 10.0  # weight of earlier edits' keys
    null_tol: float = 1e-2  # eigenvalues below null_tol * max count as the null space
    delta_steps: int = 300  # the wanted-change search stops once the target wins by `margin`
    delta_lr: float = 2.0  # in residual-stream units: counterfactuals need changes of norm 50-500
    rounds: int = 2
    a_ridge: float = 1e-2  # closed_form_a: C + a_ridge * tr(C)/d_ff * I (a few thousand tokens of C are noisy)
    protect_neutral: bool = True  # closed_form_a: the request's neutral prompts' keys get no change
    protect_suite: bool = False  # closed_form_a: and so do the neutral prompts of the edits already applied
    neutral_tokens: int = 1  # closed_form_a: positions protected per neutral prompt (its greedy continuation's)
    context_keys: int = 0  # closed_form_a: also write the edit at its prompt's last line behind this many contexts
    # closed_form_a: also keep the N training-text positions the write would reach most (felix.splice_pins);
    # an edit they push over the budget is retried without them
    text_pins: int = 0
    # closed_form_a: the weight, against the preservation text's, of the preservation prompts' input moment in
    # C (`--preserve-prompts`). EXP-46ai: held-out locality 72.5 / 74.3 / 80.7% at 0.3 / 1 / 3, drift
    # +1.21-1.31% for all. Without preservation prompts it does nothing.
    prompt_weight: float = 3.0
    # closed_form_a: the preservation prompts' moment also covers the positions predicting their 2nd..Nth
    # greedy tokens; the next token weighs as much as those together. EXP-46ak: 4 tokens at weight 10 gave
    # smaller writes that survive plain RQ4 rounding (94% retention, default 84%) at 3.6 points of held-out
    # next-token locality, and no 4-token locality
    prompt_tokens: int = 1
    # closed_form_a: after a write, the preservation prompts whose greedy next token it changed get their keys
    # kept exactly and the write is solved again from the prior state, up to this many times (EXP-46aq)
    prompt_repair: int = 0
    # prompt_repair: also keep the prompts whose next token kept its place but lost at least this many nats of
    # lead over the runner-up (None: only the prompts whose next token changed)
    prompt_repair_drop: float | None = None
    # budget
    max_ppl_increase: float = 0.005
    max_neutral_kl: float = 0.05
    # The per-edit bound does not bound a sequence (EXP-46b: 79 edits at +0.09% each gave +9.5%); this
    # one does: held-out perplexity against the checkpoint before any patch. None: no total bound.
    max_total_ppl_increase: float | None = None
    require_success: bool = True

    def replace(self, **kw: Any) -> EditConfig:
        return EditConfig(**(asdict(self) | {k: v for k, v in kw.items() if v is not None}))


@dataclass
class EditContext:
    """What a method needs besides the request: protected text and the edits already in place."""

    preserve: torch.Tensor  # (B, T) corpus windows whose behaviour the edit must keep
    neutral: list[list[int]]  # neutral prompts (token ids)
    prior: list[Example] = field(default_factory=list)  # earlier edits still applied
    covariances: InputCovariances | None = None  # closed_form_a's input covariances, kept across edits
    suite: list[list[int]] = field(default_factory=list)  # earlier edits' neutral prompts (protect_suite)
    variants: list[Example] = field(default_factory=list)  # the prompt in other contexts (context_keys)
    pins: TextPins | None = None  # the pin search (text_pins)
    pin_exclude: tuple[str, ...] = ()  # texts whose last lines are never pinned for this edit: its prompt, paraphrases
    preserve_prompts: list[list[int]] = field(default_factory=list)  # the preservation prompts (prompt_repair)
    prior_names: list[str] = field(default_factory=list)  # `prior`'s names for reports (patch ids)
