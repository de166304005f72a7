"""Splice edits: the request format, the method registry, and proposing an edit under the budget.

An edit request (one JSON object per line of a JSONL file, see docs/splicing.md):

    {"prompt": "...", "target": "...", "paraphrases": ["..."], "neutral": ["..."], "id": "optional"}

The target is the completion the model should produce greedily right after the prompt. Prompt and
target are tokenized separately and concatenated, so "the target" is always its own token sequence.

Methods (each returns the SpliceCore tensors it would write and leaves the model as it found it):

- `closed_form_a` (felix/splice_closed.py, the default): the least-energy update of `a` that writes the
  searched change at the edit's keys and nothing at earlier edits' keys.
- `closed_form` (felix/splice_closed.py): MEMIT/AlphaEdit-style least squares on the SpliceCore
  output projection `b` only, protecting preserved keys and earlier edits' keys.
- `kl_train` (felix/splice_kl.py): KL-penalized corrective training of `a` and `b`.

`propose_edit` runs one and measures the result against the budget (held-out perplexity, neutral KL,
success) with the shared measurements of felix/splice_examples.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from felix.atomic import atomic_write_text
from felix.errors import FelixError
from felix.heldout import HeldoutText, heldout_nll
from felix.jsonl import json_objects
from felix.model import FelixLM
from felix.quant_formats import QuantError
from felix.splice_closed import closed_form, closed_form_a
from felix.splice_config import EditConfig, EditContext
from felix.splice_examples import Example, contradicted, greedy_hits, kl_rows, last_logprobs
from felix.splice_kl import kl_train

if TYPE_CHECKING:
    from felix.patch_format import Patch
    from felix.splice_fold import StackFold


# -- requests ---------------------------------------------------------------------------------------


@dataclass
class EditRequest:
    """What to change: after `prompt` the model should greedily produce `target`."""

    prompt: str
    target: str
    paraphrases: list[str] = field(default_factory=list)
    neutral: list[str] = field(default_factory=list)
    id: str | None = None
    # where the request was read (`FILE:LINE` of an edits file), for errors about it; not part of the request
    where: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None) -> EditRequest:
        """A request from its JSON object; `where` (`FILE:LINE`) names it in errors, then and later."""
        at = where or "edit request"
        if not isinstance(d, dict):
            raise FelixError(f"{at}: expected a JSON object")
        unknown = set(d) - {"prompt", "target", "paraphrases", "neutral", "id"}
        if unknown:
            raise FelixError(f"{at}: unknown keys {sorted(unknown)}")
        for key in ("prompt", "target"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise FelixError(f"{at}: '{key}' must be a non-empty string")
        for key in ("paraphrases", "neutral"):
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise FelixError(f"{at}: '{key}' must be a list of non-empty strings")
        # a name for reports: an object or a list would be named by its Python repr
        if d.get("id") is not None and (isinstance(d["id"], bool) or not isinstance(d["id"], (str, int))):
            raise FelixError(f"{at}: 'id' must be a string or an integer")
        return cls(d["prompt"], d["target"], list(d.get("paraphrases", [])), list(d.get("neutral", [])),
                   None if d.get("id") is None else str(d["id"]), where)

    @property
    def name(self) -> str:
        """How errors name the request: where it was read (`FILE:LINE`), with its id; else its id or prompt's end."""
        if self.where:
            return f"{self.where} (id {self.id!r})" if self.id is not None else self.where
        return f"edit request {self.id or self.prompt[-40:]!r}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "where" and (k != "id" or self.id is not None)}


def jsonl_objects(path: str | Path, what: str) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a JSONL file's non-blank lines, each with its `path:line` for error messages; an
    unreadable file, a line that is not a JSON object (or gives a key twice) or no line at all is an error."""
    out = [(f"{path}:{n}", obj) for n, obj in json_objects(path)]
    if not out:
        raise FelixError(f"{path}: no {what}")
    return out


def load_requests(path: str | Path) -> list[EditRequest]:
    return [EditRequest.from_dict(obj, where) for where, obj in jsonl_objects(path, "edit requests")]


def save_requests(path: str | Path, requests: list[EditRequest]) -> None:
    atomic_write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in requests))


METHODS = {"kl_train": kl_train, "closed_form": closed_form, "closed_form_a": closed_form_a}
METHOD_NAMES = tuple(METHODS)


def patch_record(req: EditRequest, cfg: EditConfig, metrics: dict[str, Any], inputs: dict[str, Any] | None = None,
                 folded_to: str | None = None) -> dict[str, Any]:
    """A fact edit's patch record: the request, the method, every setting it was made with (`config`, and
    `inputs`: what it protected, e.g. the preservation prompts' file and digest) and its metrics."""
    return ({"request": req.to_dict(), "method": cfg.method, "config": asdict(cfg), "metrics": metrics}
            | ({"inputs": inputs} if inputs else {}) | ({"folded_to": folded_to} if folded_to else {}))


# EditConfig settings that decide only whether an edit is kept, not what it writes
BUDGET_FIELDS = frozenset({"max_ppl_increase", "max_neutral_kl", "max_total_ppl_increase", "require_success"})


def edit_identity(record: dict[str, Any]) -> str | None:
    """What makes two fact edits the same edit, from a patch record (`patch_record`), as comparable text; None for
    a patch that is no fact edit or whose record does not say how it was made.

    The same edit is everything its write depends on: the request's prompt, target and neutral prompts, the method
    and every setting of it (`config` less the budget's `BUDGET_FIELDS`), and the preservation text it protected
    (`inputs`: the window count, the preservation prompts' sha256). A request's `id` and paraphrases (names and
    measurements) and the budget (whether an edit is kept) are not part of it (docs/splicing.md, Patches)."""
    if record.get("method") not in METHOD_NAMES:
        return None
    try:
        req = EditRequest.from_dict(record.get("request"))
        config = asdict(EditConfig(**record["config"]))
    except (FelixError, KeyError, TypeError):  # a record from before `config` was kept, or from a newer felix
        return None
    inputs = record.get("inputs") or {}
    prompts = inputs.get("preserve_prompts")
    return json.dumps({"prompt": req.prompt, "target": req.target, "neutral": req.neutral,
                       "config": {k: v for k, v in config.items() if k not in BUDGET_FIELDS},
                       "preserve_windows": inputs.get("preserve_windows"),
                       "preserve_prompts": prompts.get("sha256") if isinstance(prompts, dict) else None},
                      sort_keys=True)


def applied_as(patches: list[Patch], record: dict[str, Any]) -> Patch | None:
    """The newest of `patches` (a `PatchStack.list()`) that made the same edit as `record` (`edit_identity`), or
    None."""
    key = edit_identity(record)
    return None if key is None else next((p for p in reversed(patches) if edit_identity(p.record) == key), None)


# -- proposing an edit under the budget -----------------------------------------------------------


@dataclass
class EditOutcome:
    after: dict[str, torch.Tensor]
    accepted: bool
    reason: str
    metrics: dict[str, Any]
    served: dict[str, torch.Tensor] | None = None  # the whole SpliceCore as served after the edit, when folded


def propose_edit(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext, heldout: HeldoutText,
                 cfg: EditConfig, paraphrases: list[Example] = (), base_nll: float | None = None,
                 origin_nll: float | None = None, fold: StackFold | None = None) -> EditOutcome:
    """Run the method, measure the result against the budget; the model is left unchanged.

    With `text_pins`, an edit refused with its pins is tried once more without them: pins are protection
    for text the edit was not asked about, never a reason to refuse it. `metrics["text_pins"]` says how many
    the outcome used, and `pinned_refusal` why the pinned attempt was refused.

    `fold`, when given, rounds the edited SpliceCore (over the keys of `ctx.prior` and this edit) to the
    deployment format, as a quantized artifact serves its stack. The outcome's tensors stay unrounded
    (the stack is rounded once, as a whole, wherever it is served) and `served` holds the rounded state.
    The edit's own cost (perplexity increase, neutral KL) is then measured on the unrounded tensors, and
    what is served (success, paraphrases, the total increase, `served_nll_after`) on the rounded ones:
    every fold re-rounds the whole stack, and against the fold before it that noise swamps an edit's cost
    (EXP-46aa: up to 1.7% on single edits, while the stack's total drift stayed under 1%).

    Budget: held-out perplexity may rise by at most `max_ppl_increase` (relative, against the model as it
    is before this edit; `base_nll` is its held-out NLL, if known) and, when `max_total_ppl_increase` is
    set, by at most that against `origin_nll` (the checkpoint before any patch); the mean KL(before ||
    after) on the neutral prompts may not exceed `max_neutral_kl`; with `require_success` an edit whose
    target is not greedy afterwards is refused too. An edit that wants another token than one of `ctx.prior`
    after the same tokens is refused before anything is run, naming it (`ctx.prior_names`).
    """
    if cfg.method not in METHOD_NAMES:
        raise FelixError(f"unknown method {cfg.method!r} (choose from {list(METHOD_NAMES)})")
    if cfg.max_total_ppl_increase is not None and origin_nll is None:
        raise FelixError("max_total_ppl_increase needs the held-out NLL of the checkpoint before any patch")
    if (i := contradicted(ex, ctx.prior)) is not None:
        # the method would either fail (the earlier edit's keys are kept, its target replayed) or break the
        # earlier edit while the stack still lists it; nothing is written, so nothing moved
        name = ctx.prior_names[i] if i < len(ctx.prior_names) else f"earlier edit {i + 1}"
        metrics = {"method": cfg.method, "layers": layers, "success": False, "ppl_increase": 0.0,
                   "neutral_kl": 0.0, "paraphrase_success": None, "contradicts": name}
        return EditOutcome({}, False, f"contradicts {name}, which wants another token after the same context; "
                                      f"roll it back first", metrics)
    if base_nll is None:
        base_nll = heldout_nll(model, heldout)
    out = _propose_once(model, ex, layers, ctx, heldout, cfg, paraphrases, base_nll, origin_nll, fold)
    if cfg.text_pins and cfg.method == "closed_form_a":
        out.metrics["text_pins"] = cfg.text_pins
        if not out.accepted:
            refusal = out.reason
            out = _propose_once(model, ex, layers, ctx, heldout, cfg.replace(text_pins=0), paraphrases, base_nll,
                                origin_nll, fold)
            out.metrics |= {"text_pins": 0, "pinned_refusal": refusal}
    return out


def _propose_once(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext, heldout: HeldoutText,
                  cfg: EditConfig, paraphrases: list[Example], nll0: float, origin_nll: float | None,
                  fold: StackFold | None) -> EditOutcome:
    before_state = model.splice_state()
    lp0 = last_logprobs(model, ctx.neutral) if ctx.neutral else None
    after = METHODS[cfg.method](model, ex, layers, ctx, cfg)
    if bad := sorted(k for k, v in after.items() if not torch.isfinite(v).all()):  # a method that diverged
        nan = float("nan")
        metrics = {"method": cfg.method, "layers": layers, "success": False, "ppl_increase": nan,
                   "heldout_nll_before": nll0, "heldout_nll_after": nan, "neutral_kl": nan, "paraphrase_success": None}
        return EditOutcome(after, False, f"the method wrote NaN or inf into {bad}", metrics)
    served, unservable = None, None
    try:
        model.load_splice_state(after, strict=False)
        nll1 = served_nll = heldout_nll(model, heldout)
        # None: no neutral prompt to measure (0.0 would read as a measurement)
        kl = float(kl_rows(lp0, last_logprobs(model, ctx.neutral)).mean()) if lp0 is not None else None
        if fold is not None:
            try:
                fold(model, [*ctx.prior, ex])
            except QuantError as exc:  # a write the format cannot store (a block scale overflows): refused, as
                unservable = str(exc)  # over budget, not an error that ends the run after earlier edits applied
                model.load_splice_state(after, strict=False)
            else:
                served = {k: v.clone() for k, v in model.splice_state().items()}
                served_nll = heldout_nll(model, heldout)
        success = greedy_hits(model, [ex])[0] and unservable is None
        para = greedy_hits(model, list(paraphrases)) if paraphrases else []
    finally:
        model.load_splice_state(before_state)
    ppl_increase = math.exp(nll1 - nll0) - 1.0
    metrics = {"method": cfg.method, "layers": layers, "success": success, "ppl_increase": ppl_increase,
               "heldout_nll_before": nll0, "heldout_nll_after": nll1, "neutral_kl": kl,
               "paraphrase_success": sum(para) / len(para) if para else None}
    if fold is not None:
        metrics["served_nll_after"] = served_nll
    # A NaN compares False with every bound, so each is checked for being a number first: finite tensors
    # can still overflow the forward pass, and a NaN perplexity or KL passed the budget.
    reasons = []
    if math.isnan(ppl_increase):
        reasons.append(f"held-out NLL is not a number (before the edit {nll0}, after it {nll1})")
    elif ppl_increase > cfg.max_ppl_increase:
        reasons.append(f"held-out perplexity +{100 * ppl_increase:.2f}% > {100 * cfg.max_ppl_increase:.2f}% budget")
    if origin_nll is not None:
        total = math.exp(served_nll - origin_nll) - 1.0
        metrics["total_ppl_increase"] = total
        bound = cfg.max_total_ppl_increase
        if bound is not None and math.isnan(total):
            reasons.append(f"held-out NLL since the checkpoint is not a number (origin {origin_nll}, "
                           f"served after the edit {served_nll})")
        elif bound is not None and total > bound:
            reasons.append(f"held-out perplexity +{100 * total:.2f}% since the checkpoint > {100 * bound:.2f}% "
                           "total budget")
    if kl is not None and math.isnan(kl):
        reasons.append("neutral KL is not a number")
    elif kl is not None and kl > cfg.max_neutral_kl:
        reasons.append(f"neutral KL {kl:.4f} > {cfg.max_neutral_kl} bound")
    if unservable is not None:
        reasons.append(f"the {fold.fmt} artifact cannot store the edited SpliceCore ({unservable})")
    if cfg.require_success and not success and unservable is None:
        reasons.append("the target is still not the greedy completion")
    return EditOutcome(after, not reasons, "; ".join(reasons) or "within budget", metrics, served)
