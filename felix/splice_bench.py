"""Sequential-stability bench: apply N edits one after another and watch everything that can drift.

Per step t (after edit t was proposed, and applied if within budget):
- success: edit t is greedy on its prompt right after it was applied (a rejected edit counts as failed);
- paraphrase: share of edit t's paraphrases that are greedy right then (None where it has none);
- retention: share of the edits applied so far (t included) that still hold;
- locality: share of the neutral pool whose greedy continuation (`locality_tokens` tokens) is unchanged
  from step 0; locality_next_token the same for its first token only (the fact itself, without the
  near-ties further on); and the mean next-token KL(step 0 || step t) on it;
- ppl_drift: exp(held-out NLL_t - NLL_0) - 1;
- norm_growth: ||S_t - S_0|| / ||S_0|| over all SpliceCore a and b (Frobenius);
- circuit distance = 1 - Jaccard(top-k attribution components at t, at 0) and stability = Spearman
  correlation of all component attribution scores between t and 0. Components and scores are those of
  `felix.splice_diagnose.attributions` (SpliceCore-layer d_ff channels), summed over the neutral pool
  with each prompt's step-0 greedy token as the behaviour: does the machinery behind unedited
  behaviour move?
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from felix.atomic import atomic_path
from felix.checkpoint import tensors_digest
from felix.errors import FelixError
from felix.heldout import HeldoutText, drift_by_source, source_nll, weighted_nll
from felix.model import FelixLM
from felix.patches import PatchStack
from felix.prefix_memo import memoized_prefix
from felix.splice_bench_progress import BenchProgress, bench_identity, load_progress, save_progress
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import InputCovariances
from felix.splice_data import context_variants, examples_of
from felix.splice_diagnose import attributions, diagnose
from felix.splice_edit import EditRequest, patch_record, propose_edit
from felix.splice_examples import Example, greedy_continuations, greedy_hits, kl_rows, last_logprobs, model_device
from felix.splice_fold import StackFold
from felix.splice_pins import TextPins


def _rank(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else 1.0


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _splice_norm(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if not k.endswith("gate")])


class CircuitProbe:
    """Attribution scores over the neutral pool, compared with those at step 0."""

    def __init__(self, model: FelixLM, prompts: list[list[int]], k: int = 50):
        self.k = k
        self.examples = [Example(tuple(p) + (0,), len(p)) for p in prompts]
        self.targets = [(int(lp.argmax()),) * 2 for lp in last_logprobs(model, prompts)]
        self.base = self.scores(model)
        self.base_top = set(self.base.topk(k).indices.tolist())

    def scores(self, model: FelixLM) -> torch.Tensor:
        eff = attributions(model, self.examples, self.targets)
        return torch.cat([eff[L] for L in sorted(eff)])

    def compare(self, model: FelixLM) -> dict[str, float]:
        s = self.scores(model)
        return {"circuit_distance": 1.0 - jaccard(set(s.topk(self.k).indices.tolist()), self.base_top),
                "circuit_stability": spearman(s, self.base)}


def next_token_examples(neutral_ex: list[Example]) -> list[Example]:
    """The same examples cut to their first completion token."""
    return [Example(e.ids[: e.n_prompt + 1], e.n_prompt) for e in neutral_ex]


def neutral_pool(model: FelixLM, tok, requests: list[EditRequest],
                 locality_tokens: int = 4) -> tuple[list[list[int]], list[Example]]:
    """Every request's neutral prompts, deduplicated (token ids), and each with the model's greedy
    `locality_tokens`-token continuation: the examples locality checks stay unchanged."""
    pool: list[list[int]] = []
    for r in requests:
        for p in r.neutral:
            ids = tok.encode(p)[-(model.cfg.max_seq_len - locality_tokens - 1):]
            if ids not in pool:
                pool.append(ids)
    cont = greedy_continuations(model, pool, locality_tokens)
    return pool, [Example(tuple(p) + c, len(p)) for p, c in zip(pool, cont, strict=True)]


@memoized_prefix  # the same windows and prompts run after every edit
def run_bench(model: FelixLM, tok, requests: list[EditRequest], n: int, cfg: EditConfig, heldout: HeldoutText,
              preserve: torch.Tensor, stack_dir: Path | None = None, circuit_every: int = 10,
              locality_tokens: int = 4, requantizers: dict[str, Callable] | None = None,
              heldout_neutral: bool = False, fold: StackFold | None = None, pins: TextPins | None = None,
              preserve_prompts: list[list[int]] = (), record_inputs: dict[str, Any] | None = None,
              log=None, progress: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Apply `n` edits in sequence through a PatchStack (a temp one unless `stack_dir`); return metrics.

    With `heldout_neutral`, every other prompt of the neutral pool (in order of first appearance) is kept
    from every edit (no budget, no protection) and its locality reported apart, as `heldout_neutral`; the
    rest as `shown_neutral`. The rates over the whole pool stay where they are.

    Each `requantizers[key](model, applied_examples) -> None` is applied to a copy of the final
    SpliceCore state; `final[key]` holds the rates after it (deployment quantization).

    With `fold` (a quantized artifact's `StackFold`), the patches stay unrounded; each edit's own cost is
    judged unrounded and its success folded, as `felix splice apply` judges them (`propose_edit`), and
    every rate and drift reported reads the stack folded onto the artifact's grid, as its loaders serve it.

    `preserve_prompts` (token ids) join the preservation text in closed_form_a's C at `cfg.prompt_weight`;
    none of them may be one of the requests' own prompts (the caller leaves those out). `record_inputs` goes
    into each patch's record (`patch_record`).

    `pins` is the pin search when `cfg.text_pins` is set (felix.splice_pins); each step's row says how many
    pins its edit used.

    With `progress` (a file path), where the bench stands is written there after every step
    (felix.splice_bench_progress); with `resume` too, the bench continues from it: the same figures as a run
    never stopped. A kept stack (`stack_dir`) must hold the patches of the steps it records (one more, made by
    a step stopped before it was recorded, is rolled back).
    """
    requests = requests[:n]
    max_len = model.cfg.max_seq_len
    pool, neutral_ex = neutral_pool(model, tok, requests, locality_tokens)
    neutral_next = next_token_examples(neutral_ex)
    held_out = {j for j in range(len(pool)) if heldout_neutral and j % 2}
    hidden = {tuple(pool[j]) for j in held_out}
    trim = max_len - locality_tokens - 1  # as neutral_pool trims

    def trimmed(prompt: str) -> list[int]:
        return tok.encode(prompt)[-trim:]

    def shown(prompts: list[str]) -> list[list[int]]:
        return [ids for ids in map(trimmed, prompts) if tuple(ids) not in hidden]

    def as_shown(req: EditRequest) -> EditRequest:
        """The request as the edit saw it, for its patch record: a later `--protect-suite` reads the neutral
        prompts there, and the held-out ones were never the edit's."""
        return replace(req, neutral=[p for p in req.neutral if tuple(trimmed(p)) not in hidden])

    subsets = {"heldout_neutral": [neutral_ex[j] for j in sorted(held_out)],
               "shown_neutral": [e for j, e in enumerate(neutral_ex) if j not in held_out]} if heldout_neutral else {}
    suite: list[list[int]] = []  # the shown neutral prompts of the edits applied so far
    state0 = model.splice_state()
    norm0 = _splice_norm(state0)
    nll0_by_source = source_nll(model, heldout)
    nll0 = weighted_nll(nll0_by_source, heldout)
    base_lp = last_logprobs(model, pool) if pool else None
    probe = CircuitProbe(model, pool) if pool else None
    tmp = tempfile.TemporaryDirectory(prefix="felix-bench-") if stack_dir is None else None
    stack = PatchStack.open(Path(tmp.name) if tmp else stack_dir)
    applied: list[int] = []
    examples = [examples_of(tok, r, max_len) for r in requests]
    covariances = InputCovariances(preserve, preserve_prompts, cfg.prompt_weight, cfg.prompt_tokens)
    covariances.keep_behaviour(model)  # of the model before any edit, also when resumed after some
    served = fold.served(model) if fold else None  # None: the model serves its own SpliceCore
    with _serving(model, served):
        kept0 = greedy_continuations(model, list(preserve_prompts), 1) if preserve_prompts else []
    steps: list[dict[str, Any]] = []
    first_break: dict[int, dict] = {}  # neutral prompt -> the step (and edit) its continuation first changed
    first_break_next: dict[int, dict] = {}
    nll = own_nll = nll0  # served (drift), and of the unrounded stack (the next edit's own cost)
    identity = bench_identity(
        model, requests, cfg, heldout_neutral=heldout_neutral, locality_tokens=locality_tokens,
        circuit_every=circuit_every, preserve=preserve, preserve_prompts=list(preserve_prompts),
        heldout=tensors_digest(heldout.windows), heldout_weights=heldout.weights, fold=fold.fmt if fold else None,
        pins=tensors_digest({"w": pins.windows}) if pins else None, record_inputs=record_inputs,
        kept=str(stack_dir) if stack_dir else None,
        device=model_device(model).type) if progress else {}  # another device's kernels give other floats
    done, seconds = 0, 0.0
    t0 = time.perf_counter()
    try:
        if resume:
            if progress is None:
                raise ValueError("resume needs a progress file")
            p = load_progress(progress, identity)
            if stack_dir is not None:  # a temporary stack is a fresh one, and the patches it held are gone
                _resume_stack(stack, model, len(p.applied), progress)
            done, seconds = p.step, p.seconds
            applied, suite, steps, nll, own_nll = p.applied, p.suite, p.steps, p.nll, p.own_nll
            first_break, first_break_next = p.first_break, p.first_break_next
            model.load_splice_state(p.own)
            served = p.served
        for t, (req, (ex, paras)) in enumerate(zip(requests, examples, strict=True), 1):
            if t <= done:
                continue
            layers = cfg.layers or diagnose(model, tok, ex)["chosen_layers"]
            ctx = EditContext(preserve, shown(req.neutral), [examples[i][0] for i in applied], covariances,
                              suite=list(suite),
                              variants=context_variants(tok, req, preserve, cfg.context_keys, max_len),
                              pins=pins, pin_exclude=(req.prompt, *req.paraphrases),
                              preserve_prompts=[list(p) for p in preserve_prompts],
                              prior_names=[f"edit {i + 1}" + (f" ({requests[i].id})" if requests[i].id else "")
                                           for i in applied])
            out = propose_edit(model, ex, layers, ctx, heldout, cfg, paras, base_nll=own_nll, origin_nll=nll0,
                               fold=fold)
            if out.accepted:
                stack.apply(model, out.after, patch_record(as_shown(req), cfg, out.metrics, record_inputs,
                                                           fold.fmt if fold else None))
                applied.append(t - 1)
                own_nll = out.metrics["heldout_nll_after"]
                nll = out.metrics.get("served_nll_after", own_nll)
                suite += [p for p in ctx.neutral if p not in suite]
                served = out.served
            with _serving(model, served):  # measured as served
                now = greedy_hits(model, [ex, *paras])
                held = greedy_hits(model, [examples[i][0] for i in applied]) if applied else []
                row = {"step": t, "id": req.id, "accepted": out.accepted, "reason": out.reason, "layers": layers,
                       "success": bool(out.accepted and now[0]),
                       # None: the edit has no paraphrases (0 of 0 is no failure); rejected: all failed
                       "paraphrase": (sum(now[1:]) / len(paras) if out.accepted else 0.0) if paras else None,
                       "retention": sum(held) / len(held) if held else 1.0,
                       "ppl_drift": math.exp(nll - nll0) - 1.0,
                       "norm_growth": float((_splice_norm(model.splice_state()) - norm0).norm() / norm0.norm()),
                       "edit_ppl_increase": out.metrics["ppl_increase"], "edit_neutral_kl": out.metrics["neutral_kl"]}
                if "text_pins" in out.metrics:
                    row["text_pins"] = out.metrics["text_pins"]
                if pool:
                    kept, kept_next = greedy_hits(model, neutral_ex), greedy_hits(model, neutral_next)
                    row["locality"] = sum(kept) / len(kept)
                    row["locality_next_token"] = sum(kept_next) / len(kept_next)
                    if held_out:
                        row["locality_heldout"] = sum(kept[j] for j in held_out) / len(held_out)
                    for j in (j for j, k in enumerate(kept) if not k):
                        first_break.setdefault(j, {"step": t, "edit": req.id})
                    for j in (j for j, k in enumerate(kept_next) if not k):
                        first_break_next.setdefault(j, {"step": t, "edit": req.id})
                    row["neutral_kl"] = float(kl_rows(base_lp, last_logprobs(model, pool)).mean())
                if probe and (t % circuit_every == 0 or t == len(requests)):
                    row |= probe.compare(model)
            steps.append(row)
            if progress:
                save_progress(progress, identity, BenchProgress(
                    t, applied, suite, steps, first_break, first_break_next, nll, own_nll,
                    seconds + time.perf_counter() - t0, model.splice_state(), served))
            if log:
                log(row)
        with _serving(model, served):
            final = _final(model, examples, steps, neutral_ex, pool, base_lp, nll0_by_source, heldout)
            final["locality_breaks"] = _locality_breaks(model, tok, pool, neutral_ex, first_break, first_break_next)
            final |= {key: _locality(model, sub) | {"prompts": len(sub)} for key, sub in subsets.items()}
            if kept0:  # the preservation prompts' own next tokens (what --prompt-repair keeps)
                now = greedy_continuations(model, list(preserve_prompts), 1)
                final["preserve_prompts_kept"] = sum(a == b for a, b in zip(kept0, now, strict=True)) / len(now)
        final["seconds"] = seconds + time.perf_counter() - t0
        for key, requantize in (requantizers or {}).items():
            final[key] = _requantized(model, requantize, [examples[i][0] for i in applied], examples, neutral_ex,
                                      heldout, nll0_by_source, subsets)
    finally:
        model.load_splice_state(state0)  # the bench never leaves its edits in the caller's model
        if tmp:
            tmp.cleanup()
    return {"config": {"n": len(requests), **cfg.__dict__, "preserve_prompts": len(covariances.prompts),
                       "heldout": heldout.describe()}, "final": final,
            "steps": steps}


def _resume_stack(stack: PatchStack, model: FelixLM, applied: int, progress: Path) -> None:
    """Bring a kept stack to the `applied` patches a progress file records; refuse one that does not hold them."""
    if len(stack) == applied + 1:  # the last step's patch was written, its progress not
        stack.rollback(model, stack.top().id)
    if len(stack) != applied:
        raise FelixError(f"{stack.dir}: holds {len(stack)} patches where {progress} records {applied} applied edits; "
                         "resume with the stack the bench kept")


@contextmanager
def _serving(model: FelixLM, served: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """`model` holding the SpliceCore it serves (`served`; None: its own) inside the block, its own after."""
    if served is None:
        yield
        return
    own = model.splice_state()
    model.load_splice_state(served)
    try:
        yield
    finally:
        model.load_splice_state(own)


def _rates(model: FelixLM, examples, neutral_ex) -> dict[str, float | None]:
    edits = greedy_hits(model, [e for e, _ in examples])
    paras = greedy_hits(model, [p for _, ps in examples for p in ps])
    return {"retention_rate": sum(edits) / len(edits),
            "paraphrase_rate": _mean(paras), **_locality(model, neutral_ex)}


def _mean(xs: list) -> float | None:
    """The mean of `xs`; None for none (a share of no paraphrases is not 0)."""
    return sum(xs) / len(xs) if xs else None


def _locality(model: FelixLM, neutral_ex: list[Example]) -> dict[str, float]:
    """Shares of `neutral_ex` whose greedy continuation, and whose next token, are unchanged."""
    if not neutral_ex:
        return {"locality_rate": 1.0, "locality_next_token_rate": 1.0}
    return {"locality_rate": sum(greedy_hits(model, neutral_ex)) / len(neutral_ex),
            "locality_next_token_rate": sum(greedy_hits(model, next_token_examples(neutral_ex))) / len(neutral_ex)}


def _locality_breaks(model: FelixLM, tok, pool, neutral_ex, first_break, first_break_next) -> list[dict[str, Any]]:
    """Each neutral prompt whose continuation differs at the end: its last line, its step-0 and final
    continuations, whether its next token differs at the end, and the step (edit) at which its whole
    continuation and its next token first changed."""
    if not pool:
        return []
    broken = [j for j, k in enumerate(greedy_hits(model, neutral_ex)) if not k]
    now = greedy_continuations(model, [pool[j] for j in broken], len(neutral_ex[0].target))
    next_kept = greedy_hits(model, next_token_examples([neutral_ex[j] for j in broken])) if broken else []
    return [{"prompt": tok.decode(pool[j]).split("\n")[-1][-60:], "before": tok.decode(list(neutral_ex[j].target)),
             "after": tok.decode(list(cont)), "next_token_changed": not kept, "first_changed": first_break.get(j),
             "next_token_first_changed": first_break_next.get(j)}
            for j, cont, kept in zip(broken, now, next_kept, strict=True)]


def _drift(model: FelixLM, heldout: HeldoutText, nll0_by_source: dict[str, float]) -> dict[str, Any]:
    """Held-out perplexity drift of the mix and of each source, against the model before any edit."""
    nll = source_nll(model, heldout)
    before, after = weighted_nll(nll0_by_source, heldout), weighted_nll(nll, heldout)
    return {"ppl_drift": math.exp(after - before) - 1.0, "ppl_drift_by_source": drift_by_source(nll0_by_source, nll),
            "heldout_ppl_before": math.exp(before), "heldout_ppl_after": math.exp(after)}


def _final(model, examples, steps, neutral_ex, pool, base_lp, nll0_by_source, heldout) -> dict[str, Any]:
    out = {"n": len(steps), "applied": sum(s["accepted"] for s in steps),
           "success_rate": sum(s["success"] for s in steps) / len(steps),
           "paraphrase_rate_when_applied": _mean([s["paraphrase"] for s in steps if s["paraphrase"] is not None]),
           **_rates(model, examples, neutral_ex),
           **_drift(model, heldout, nll0_by_source), "norm_growth": steps[-1]["norm_growth"],
           "neutral_kl": float(kl_rows(base_lp, last_logprobs(model, pool)).mean()) if pool else 0.0,
           "rejections": [{"step": s["step"], "reason": s["reason"]} for s in steps if not s["accepted"]]}
    if any("text_pins" in s for s in steps):
        out["applied_with_pins"] = sum(bool(s["accepted"] and s["text_pins"]) for s in steps)
    circuit = [s for s in steps if "circuit_distance" in s]
    if circuit:
        out["circuit_distance"] = circuit[-1]["circuit_distance"]
        out["circuit_stability"] = circuit[-1]["circuit_stability"]
    return out


def _requantized(model: FelixLM, requantize, applied, examples, neutral_ex, heldout, nll0_by_source,
                 subsets: dict[str, list[Example]]) -> dict[str, Any]:
    """Rates and drift after re-quantizing the spliced SpliceCore tensors (the caller's model is restored);
    `{"error": ...}` where the format cannot hold them (a block scale overflows, say)."""
    spliced = model.splice_state()
    try:
        try:
            requantize(model, applied)
        except FelixError as exc:
            return {"error": str(exc)}
        return (_rates(model, examples, neutral_ex) | {key: _locality(model, sub) for key, sub in subsets.items()}
                | _drift(model, heldout, nll0_by_source))
    finally:
        model.load_splice_state(spliced)


def plot_bench(result: dict[str, Any], out_png: Path, title: str = "felix splice bench") -> Path:
    """Four panels: rates, perplexity drift, SpliceCore norm growth, circuit distance/stability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    t = [s["step"] for s in steps]
    cum_success = [sum(x["success"] for x in steps[:i + 1]) / (i + 1) for i in range(len(steps))]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(t, cum_success, label="success when applied (cumulative)")
    ax[0, 0].plot(t, [s["retention"] for s in steps], label="retention of applied edits")
    ax[0, 0].plot(t, [s.get("locality", 1.0) for s in steps], label="neutral unchanged")
    ax[0, 0].set_ylim(-0.02, 1.02)
    ax[0, 0].legend(fontsize=8)
    ax[0, 0].set_title("rates")
    ax[0, 1].plot(t, [100 * s["ppl_drift"] for s in steps])
    ax[0, 1].axhline(2.0, color="r", ls="--", lw=0.8)
    ax[0, 1].set_title("held-out perplexity drift (%)")
    ax[1, 0].plot(t, [s["norm_growth"] for s in steps])
    ax[1, 0].set_title("SpliceCore norm growth ||S_t - S_0|| / ||S_0||")
    c = [s for s in steps if "circuit_distance" in s]
    ax[1, 1].plot([s["step"] for s in c], [s["circuit_distance"] for s in c], "o-", label="distance (1-Jaccard@50)")
    ax[1, 1].plot([s["step"] for s in c], [s["circuit_stability"] for s in c], "s-", label="stability (Spearman)")
    ax[1, 1].set_ylim(-0.02, 1.02)
    ax[1, 1].legend(fontsize=8)
    ax[1, 1].set_title("circuit vs step 0")
    for a in ax.flat:
        a.set_xlabel("edit step")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out_png
