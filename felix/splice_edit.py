"""Splice edits: the request format, the shared measurements, and the two methods that write SpliceCore.

An edit request (one JSON object per line of a JSONL file, see docs/splicing.md):

    {"prompt": "...", "target": "...", "paraphrases": ["..."], "neutral": ["..."], "id": "optional"}

The target is the completion the model should produce greedily right after the prompt. Prompt and
target are tokenized separately and concatenated, so "the target" is always its own token sequence.

Methods (each returns the SpliceCore tensors it would write and leaves the model as it found it):

- `kl_train`: KL-penalized corrective training of the chosen layers' SpliceCore `a` and `b` — cross-
  entropy on the target, plus replay of earlier edits, plus kl_weight * KL(pre-edit || edited) on neutral
  prompts and preservation text.
- `closed_form` (felix/splice_closed.py): MEMIT/AlphaEdit-style least squares on the SpliceCore
  output projection `b` only, protecting preserved keys and earlier edits' keys.

The measurements (teacher-forced greedy checks, held-out NLL, neutral KL) live here too because the
budget check, the CLI and the bench all use the same definitions.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from felix.errors import FelixError
from felix.heldout import HeldoutText, heldout_nll
from felix.model import FelixLM

if TYPE_CHECKING:
    from felix.splice_closed import InputCovariances
    from felix.splice_fold import StackFold
    from felix.splice_pins import TextPins


# -- requests ---------------------------------------------------------------------------------------


@dataclass
class EditRequest:
    """What to change: after `prompt` the model should greedily produce `target`."""

    prompt: str
    target: str
    paraphrases: list[str] = field(default_factory=list)
    neutral: list[str] = field(default_factory=list)
    id: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "edit request") -> EditRequest:
        if not isinstance(d, dict):
            raise FelixError(f"{where}: expected a JSON object")
        unknown = set(d) - {"prompt", "target", "paraphrases", "neutral", "id"}
        if unknown:
            raise FelixError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("prompt", "target"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise FelixError(f"{where}: '{key}' must be a non-empty string")
        for key in ("paraphrases", "neutral"):
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise FelixError(f"{where}: '{key}' must be a list of non-empty strings")
        return cls(d["prompt"], d["target"], list(d.get("paraphrases", [])), list(d.get("neutral", [])),
                   None if d.get("id") is None else str(d["id"]))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return out if self.id is not None else {k: v for k, v in out.items() if k != "id"}


def jsonl_objects(path: str | Path, what: str) -> list[tuple[str, Any]]:
    """The JSON values of a JSONL file's non-blank lines, each with its `path:line` for error messages;
    an unreadable file, a line that is not JSON or no line at all is an error naming `what`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FelixError(f"cannot read {what} {path}: {exc}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except ValueError as exc:
                raise FelixError(f"{path}:{i}: not JSON ({exc})") from None
    if not out:
        raise FelixError(f"{path}: no {what}")
    return out


def load_requests(path: str | Path) -> list[EditRequest]:
    return [EditRequest.from_dict(obj, where) for where, obj in jsonl_objects(path, "edit requests")]


def save_requests(path: str | Path, requests: list[EditRequest]) -> None:
    from felix.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in requests))


# -- token-level examples and measurements ----------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """Token ids; ids[:n_prompt] are the context, the rest the completion it should be followed by."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def target(self) -> tuple[int, ...]:
        return self.ids[self.n_prompt:]


def make_example(tok, prompt: str, target: str, max_len: int) -> Example:
    p, t = tok.encode(prompt), tok.encode(target)
    if not p or not t:
        raise FelixError("prompt and target must both encode to at least one token")
    p = p[-(max_len - len(t)):]  # keep the end of an over-long prompt: the next-token decision lives there
    return Example(tuple(p + t), len(p))


def _batch(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, labels, lengths): right-padded ids; labels[t] = ids[t+1] on completion positions, else -100."""
    T = max(len(e.ids) for e in examples)
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, e.n_prompt - 1 : len(e.ids) - 1] = torch.tensor(e.ids[e.n_prompt:])
    return idx.to(device), labels.to(device), torch.tensor([len(e.ids) for e in examples])


def _device(model: FelixLM) -> torch.device:
    return model.tok_emb.weight.device


def completion_nll(model: FelixLM, examples: list[Example]) -> torch.Tensor:
    """Mean NLL of the completion tokens (differentiable)."""
    idx, labels, _ = _batch(examples, _device(model))
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def greedy_hits(model: FelixLM, examples: list[Example], chunk: int = 64) -> list[bool]:
    """Whether greedy decoding after each prompt yields exactly its completion tokens.

    Teacher forcing is exact here: greedy decoding produces the completion iff the argmax at every
    completion position equals the next completion token, so one batched forward replaces a decode loop.
    """
    out: list[bool] = []
    for s in range(0, len(examples), chunk):
        idx, labels, _ = _batch(examples[s : s + chunk], _device(model))
        pred = model(idx).argmax(-1)
        ok = (pred == labels) | (labels == -100)
        out += ok.all(dim=1).tolist()
    return out


@torch.no_grad()
def targets_win(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> bool:
    """Whether every labelled token's logit beats the best other token's by at least `margin`."""
    pos = labels != -100
    tgt = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    rival = logits.scatter(-1, labels.clamp(min=0)[..., None], float("-inf")).amax(-1)
    return bool(((tgt - rival)[pos] >= margin).all())


@torch.no_grad()
def greedy_continuations(model: FelixLM, prompts: list[list[int]], n: int,
                         chunk: int = 64) -> list[tuple[int, ...]]:
    """Each prompt's greedy `n`-token continuation (fewer where `max_seq_len` ends it), `chunk` prompts
    at a time: n right-padded forward passes per chunk, each reading every row's logits at its own end.

    No KV cache: the continuations are short, and recomputing the prompts batched costs less than
    decoding them one at a time. The tokens are the argmaxes `greedy_hits` checks by teacher forcing.
    """
    limit = model.cfg.max_seq_len
    for p in prompts:
        if not p or len(p) >= limit:
            raise ValueError(f"a prompt of {len(p)} tokens has no room to continue in max_seq_len {limit}")
    out: list[tuple[int, ...]] = []
    for s in range(0, len(prompts), chunk):
        rows = [list(p) for p in prompts[s : s + chunk]]
        ends = [min(len(p) + n, limit) for p in rows]
        for _ in range(n):
            live = [i for i, r in enumerate(rows) if len(r) < ends[i]]
            if not live:
                break
            idx, _, lengths = _batch([Example(tuple(rows[i]), len(rows[i])) for i in live], _device(model))
            nxt = model(idx)[torch.arange(len(live)), lengths - 1].argmax(-1).tolist()
            for i, t in zip(live, nxt, strict=True):
                rows[i].append(int(t))
        out += [tuple(r[len(p):]) for r, p in zip(rows, prompts[s : s + chunk], strict=True)]
    return out


@torch.no_grad()
def last_logprobs(model: FelixLM, prompts: list[list[int]], chunk: int = 64) -> torch.Tensor:
    """(N, vocab) log-probabilities of the next token after each prompt."""
    rows = []
    for s in range(0, len(prompts), chunk):
        part = [Example(tuple(p), len(p)) for p in prompts[s : s + chunk]]
        idx, _, lengths = _batch(part, _device(model))
        logits = model(idx)
        rows.append(torch.log_softmax(logits[torch.arange(len(part)), lengths - 1].float(), -1))
    return torch.cat(rows)


def kl_rows(base_lp: torch.Tensor, cur_lp: torch.Tensor) -> torch.Tensor:
    """KL(base || current) per row, from log-probabilities."""
    return (base_lp.exp() * (base_lp - cur_lp)).sum(-1)


# -- methods -----------------------------------------------------------------------------------------


@dataclass
class EditConfig:
    """Knobs of both methods and of the budget. Defaults are the measured ones (docs/splicing.md)."""

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


@contextmanager
def grads_only_for(model: FelixLM, params: list[torch.nn.Parameter]):
    """Let backward compute gradients for `params` alone (the frozen rest costs nothing); restore after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None


def splice_names(layers: list[int], keys: tuple[str, ...] = ("a", "b")) -> list[str]:
    return [f"layers.{L}.mlp.splice.{k}" for L in layers for k in keys]


def _kl_term(model: FelixLM, base_lp: torch.Tensor, prompts: list[list[int]], preserve: torch.Tensor,
             base_pres: torch.Tensor | None) -> torch.Tensor:
    parts = []
    if prompts:
        part = [Example(tuple(p), len(p)) for p in prompts]
        idx, _, lengths = _batch(part, _device(model))
        lp = torch.log_softmax(model(idx)[torch.arange(len(part)), lengths - 1].float(), -1)
        parts.append(kl_rows(base_lp, lp).mean())
    if base_pres is not None:
        lp = torch.log_softmax(model(preserve.to(_device(model))).float(), -1)
        parts.append(kl_rows(base_pres, lp).mean())
    return sum(parts) / max(len(parts), 1) if parts else torch.zeros(())


def kl_train(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext,
             cfg: EditConfig) -> dict[str, torch.Tensor]:
    """KL-penalized corrective training of the SpliceCore `a`/`b` of `layers`; returns the new tensors."""
    if cfg.train not in ("ab", "b") or cfg.optimizer not in ("adam", "sgd"):
        raise FelixError(f"edit config: train must be ab or b and optimizer adam or sgd, got {cfg.train!r}, "
                         f"{cfg.optimizer!r}")
    names = splice_names(layers, tuple(cfg.train))
    before = {k: v for k, v in model.splice_state().items() if k in names}
    params = dict(model.named_parameters())
    train = [params[n] for n in names]
    with torch.no_grad():
        base_lp = last_logprobs(model, ctx.neutral) if ctx.neutral else None
        # a few short windows: the KL only has to see the model's typical behaviour, and every step pays for it
        pres = ctx.preserve[: cfg.kl_windows, :64]
        base_pres = torch.log_softmax(model(pres.to(_device(model))).float(), -1) if pres.numel() else None
    gen = torch.Generator().manual_seed(len(ctx.prior))
    opt = torch.optim.Adam(train, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(train, lr=cfg.lr)
    try:
        with grads_only_for(model, train):
            for _ in range(cfg.steps):
                # A fresh random subset of earlier edits each step: over the steps every one gets replayed
                # without the batch growing with the stack.
                pick = torch.randperm(len(ctx.prior), generator=gen)[: cfg.max_replay].tolist() if cfg.replay else []
                prior = [ctx.prior[i] for i in sorted(pick)]
                idx, labels, _ = _batch([ex, *prior], _device(model))
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


def _methods() -> dict:
    from felix.splice_closed import closed_form, closed_form_a  # imports this module: resolved at call time

    return {"kl_train": kl_train, "closed_form": closed_form, "closed_form_a": closed_form_a}


METHOD_NAMES = ("kl_train", "closed_form", "closed_form_a")


def patch_record(req: EditRequest, cfg: EditConfig, metrics: dict[str, Any], inputs: dict[str, Any] | None = None,
                 folded_to: str | None = None) -> dict[str, Any]:
    """A fact edit's patch record: the request, the method, every setting it was made with (`config`, and
    `inputs`: what it protected, e.g. the preservation prompts' file and digest) and its metrics."""
    return ({"request": req.to_dict(), "method": cfg.method, "config": asdict(cfg), "metrics": metrics}
            | ({"inputs": inputs} if inputs else {}) | ({"folded_to": folded_to} if folded_to else {}))


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
    target is not greedy afterwards is refused too.
    """
    if cfg.method not in METHOD_NAMES:
        raise FelixError(f"unknown method {cfg.method!r} (choose from {list(METHOD_NAMES)})")
    if cfg.max_total_ppl_increase is not None and origin_nll is None:
        raise FelixError("max_total_ppl_increase needs the held-out NLL of the checkpoint before any patch")
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
    after = _methods()[cfg.method](model, ex, layers, ctx, cfg)
    served = None
    try:
        model.load_splice_state(after, strict=False)
        nll1 = served_nll = heldout_nll(model, heldout)
        kl = float(kl_rows(lp0, last_logprobs(model, ctx.neutral)).mean()) if lp0 is not None else 0.0
        if fold is not None:
            fold(model, [*ctx.prior, ex])
            served = {k: v.clone() for k, v in model.splice_state().items()}
            served_nll = heldout_nll(model, heldout)
        success = greedy_hits(model, [ex])[0]
        para = greedy_hits(model, list(paraphrases)) if paraphrases else []
    finally:
        model.load_splice_state(before_state)
    ppl_increase = math.exp(nll1 - nll0) - 1.0
    metrics = {"method": cfg.method, "layers": layers, "success": success, "ppl_increase": ppl_increase,
               "heldout_nll_before": nll0, "heldout_nll_after": nll1, "neutral_kl": kl,
               "paraphrase_success": sum(para) / len(para) if para else None}
    if fold is not None:
        metrics["served_nll_after"] = served_nll
    reasons = []
    if ppl_increase > cfg.max_ppl_increase:
        reasons.append(f"held-out perplexity +{100 * ppl_increase:.2f}% > {100 * cfg.max_ppl_increase:.2f}% budget")
    if origin_nll is not None:
        total = math.exp(served_nll - origin_nll) - 1.0
        metrics["total_ppl_increase"] = total
        if cfg.max_total_ppl_increase is not None and total > cfg.max_total_ppl_increase:
            reasons.append(f"held-out perplexity +{100 * total:.2f}% since the checkpoint > "
                           f"{100 * cfg.max_total_ppl_increase:.2f}% total budget")
    if kl > cfg.max_neutral_kl:
        reasons.append(f"neutral KL {kl:.4f} > {cfg.max_neutral_kl} bound")
    if cfg.require_success and not success:
        reasons.append("the target is still not the greedy completion")
    return EditOutcome(after, not reasons, "; ".join(reasons) or "within budget", metrics, served)
