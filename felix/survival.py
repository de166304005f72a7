"""The survival report: what a model loses when it is quantized, measured where QUAIL cares most.

Full precision against the fake-quantized model (`felix.quantize.fake_quantize_model`, which computes
exactly what the packed artifact computes):

- **whitelisted positions** (the refusal probe set): every held-out val position whose target is a
  whitelisted token (`quail.tokens`) and that has `context` tokens before it, those tokens as its
  prompt (positions nearer the start of a source are left out). On it:
  top-1 agreement full vs quantized, the refusal rate (greedy next token is whitelisted — the model
  emits the refusal/schema token where the data does), and the margin z_target − max_{j≠target} z_j;
- **the val split as a whole**: perplexity of both models, KL(full ‖ quantized) per token and top-1
  agreement over every position;
- **task prompts**: the task suite's dev prompts, greedy completion, JSON validity per
  `felix.tasks.parse` (≈ 0 for demo-scale models; reported, not hidden).

`compare` takes two models, so a test (or an experiment) can pass any pair; `survival_report` loads a
checkpoint and quantizes it under a named format, its applied splices included as `felix quantize` packs them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from felix.atomic import atomic_path, check_apart, check_output
from felix.datamix import DataMix, checkpoint_mix
from felix.errors import FelixError
from felix.generate import generate
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.quail import Whitelist, logit_margin, resolve_whitelist
from felix.quantize import fake_quantize_model
from felix.shards import check_token_ids
from felix.splice_data import vocab_note
from felix.splice_pack import splice_rounding as resolve_splice_rounding
from felix.splice_pack import spliced_state
from felix.tasks.parse import ParseError, parse_completion
from felix.tasks.suite import load_set, render_prompt
from felix.tokenizer import FelixTokenizer

MARGIN_BINS = 40


def _val_tokens(mix: DataMix | str | Path, vocab_size: int) -> list[np.ndarray]:
    """The val split of every source of a data mix (or the mix file at a path), one array per source; FelixError
    naming the shard file of an id past the model's `vocab_size`."""
    if not isinstance(mix, DataMix):
        mix = DataMix.load(mix)
    shards = mix.open_shards(verify=False)
    out = []
    for name in sorted(shards):
        arrays = shards[name].tokens("val")
        for path, a in zip(shards[name].files("val"), arrays, strict=True):
            check_token_ids(a, vocab_size, path, 0, vocab_note(vocab_size, "the model"))
        if arrays:
            out.append(np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]))
    if not out:
        raise FelixError(f"{mix.path}: the mix has no val split to measure on")
    return out


def val_windows(sources: Sequence[np.ndarray], seq_len: int, per_source: int) -> torch.Tensor:
    """Up to `per_source` non-overlapping windows of seq_len + 1 tokens from each source (evenly spread)."""
    rows = []
    for toks in sources:
        n = (len(toks) - 1) // seq_len
        if n <= 0:
            continue
        for k in np.linspace(0, n - 1, min(n, per_source)).round().astype(int):
            rows.append(torch.from_numpy(toks[k * seq_len: k * seq_len + seq_len + 1].copy()))
    if not rows:
        raise FelixError(f"the val split is shorter than one window of {seq_len + 1} tokens")
    return torch.stack(rows)


def probe_windows(sources: Sequence[np.ndarray], whitelist: Whitelist, context: int,
                  limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The refusal probe set: (prompts (N, context), targets (N,)) for held-out positions whose target is
    whitelisted and that have `context` tokens before them (at most `limit`, evenly spread)."""
    ids = np.asarray(whitelist.ids)
    found = []
    for toks in sources:
        found += [(toks, int(i)) for i in np.flatnonzero(np.isin(toks, ids)) if i >= context]
    if len(found) > limit:
        found = [found[k] for k in np.linspace(0, len(found) - 1, limit).round().astype(int)]
    x = torch.tensor(np.stack([t[i - context: i] for t, i in found]) if found else np.zeros((0, context)),
                     dtype=torch.long)
    y = torch.tensor([int(t[i]) for t, i in found], dtype=torch.long)
    return x, y


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 16, last_only: bool = False) -> torch.Tensor:
    outs = []
    for i in range(0, len(x), batch):
        h = model.final_hidden(x[i: i + batch])
        outs.append(model.lm_head(h[:, -1] if last_only else h).float())
    return torch.cat(outs) if outs else torch.zeros(0)


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    qs = torch.quantile(values.float(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    return {"p05": qs[0].item(), "p25": qs[1].item(), "median": qs[2].item(), "p75": qs[3].item(),
            "p95": qs[4].item(), "mean": values.float().mean().item(), "positive": (values > 0).float().mean().item()}


def whitelist_metrics(full: torch.nn.Module, quant: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      whitelist: Whitelist) -> tuple[dict, dict[str, list[float]]]:
    """Agreement, refusal rates and margins at the probe positions; also the raw margins (for plots)."""
    if len(y) == 0:
        return {"positions": 0}, {"full": [], "quant": []}
    zf, zq = _logits(full, x, last_only=True), _logits(quant, x, last_only=True)
    af, aq = zf.argmax(-1), zq.argmax(-1)
    wl = torch.tensor(whitelist.ids)
    mf, mq = logit_margin(zf, y), logit_margin(zq, y)
    refusal_full, refusal_quant = torch.isin(af, wl).float().mean().item(), torch.isin(aq, wl).float().mean().item()
    # survival: of the positions where full precision emits the target, the share the quantized model still
    # emits; None (not 0, which would read as "all lost") when full precision emits it nowhere
    hits = int((af == y).sum())
    return {"positions": len(y),
            "top1_agreement": (af == aq).float().mean().item(),
            "refusal_rate_full": refusal_full, "refusal_rate_quant": refusal_quant,
            "refusal_rate_drop": refusal_full - refusal_quant,
            "survival": int(((aq == y) & (af == y)).sum()) / hits if hits else None,
            "margin_full": _quantiles(mf), "margin_quant": _quantiles(mq)}, {"full": mf.tolist(), "quant": mq.tolist()}


def val_metrics(full: torch.nn.Module, quant: torch.nn.Module, windows: torch.Tensor,
                whitelist: Whitelist | None = None) -> dict:
    """Perplexity of both models, mean KL(full ‖ quant) per token and top-1 agreement over `windows`;
    with a whitelist, also the false-refusal rate: the share of positions whose target is not
    whitelisted where the model's greedy token is (a margin loss can teach a model to refuse everything)."""
    if windows.numel() == 0:
        raise FelixError("no val windows to measure perplexity and KL on")
    x, y = windows[:, :-1], windows[:, 1:]
    nll_f = nll_q = kl = agree = 0.0
    n = 0
    wl = torch.tensor(whitelist.ids if whitelist else [], dtype=torch.long)
    false_f = false_q = others = 0
    for i in range(0, len(x), 8):
        zf, zq = _logits(full, x[i: i + 8]), _logits(quant, x[i: i + 8])
        lf, lq = F.log_softmax(zf, -1), F.log_softmax(zq, -1)
        t = y[i: i + 8]
        nll_f -= lf.gather(-1, t.unsqueeze(-1)).sum().item()
        nll_q -= lq.gather(-1, t.unsqueeze(-1)).sum().item()
        kl += (lf.exp() * (lf - lq)).sum(-1).clamp_min(0).sum().item()  # clamp: fp rounding of an exact 0
        agree += (zf.argmax(-1) == zq.argmax(-1)).sum().item()
        n += t.numel()
        other = ~torch.isin(t, wl)
        others += int(other.sum())
        false_f += int((torch.isin(zf.argmax(-1), wl) & other).sum())
        false_q += int((torch.isin(zq.argmax(-1), wl) & other).sum())
    return {"tokens": n, "ppl_full": math.exp(nll_f / n), "ppl_quant": math.exp(nll_q / n),
            "ppl_delta": math.exp(nll_q / n) - math.exp(nll_f / n), "kl": kl / n, "top1_agreement": agree / n,
            "false_refusal_full": false_f / max(1, others), "false_refusal_quant": false_q / max(1, others)}


def task_prompt_ids(tokenizer: FelixTokenizer, item: dict, limit: int) -> list[int] | None:
    """A task-suite item as a chat prompt (system, user, assistant turn opened), or None when too long."""
    system, user = render_prompt(item)
    text = f"<|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>"
    ids = tokenizer.encode(text, allow_special=True)
    return ids[-limit:] if len(ids) > limit else ids


def json_validity(full: torch.nn.Module, quant: torch.nn.Module, tokenizer: FelixTokenizer, n_prompts: int,
                  max_new_tokens: int = 64) -> dict:
    """Share of task-suite dev prompts whose greedy completion parses as a JSON object, per model.

    Prompts longer than the model's context keep their last tokens (the instruction to answer in JSON
    sits at the end), leaving room for `max_new_tokens`, at most half the context: a short context keeps
    half its room for the prompt rather than one token.
    """
    if n_prompts <= 0:
        return {"prompts": 0}
    items = load_set("dev")[:n_prompts]
    max_new_tokens = max(1, min(max_new_tokens, full.cfg.max_seq_len // 2))
    room = full.cfg.max_seq_len - max_new_tokens
    stops = tuple(i for s, i in tokenizer.special_ids.items() if s in ("<|endoftext|>", "<|end|>"))
    valid = {"full": 0, "quant": 0}
    for item in items:
        ids = task_prompt_ids(tokenizer, item, room)
        for name, model in (("full", full), ("quant", quant)):
            out = generate(model, ids, max_new_tokens, greedy=True, stop_ids=stops)
            with contextlib.suppress(ParseError):  # an unparseable completion simply isn't valid
                parse_completion(tokenizer.decode([t for t in out if t not in stops]))
                valid[name] += 1
    return {"prompts": len(items), "max_new_tokens": max_new_tokens, "valid_full": valid["full"] / len(items),
            "valid_quant": valid["quant"] / len(items)}


def compare(full: torch.nn.Module, quant: torch.nn.Module, tokenizer: FelixTokenizer, whitelist: Whitelist,
            mix: DataMix | str | Path, seq_len: int, val_windows_per_source: int = 16, probe_limit: int = 256,
            json_prompts: int = 4, keep_margins: bool = False) -> dict:
    """The survival report of `quant` against `full` (both in eval mode, same tokenizer)."""
    sources = _val_tokens(mix, full.cfg.vocab_size)
    context = min(seq_len, 64)  # enough context for a request; short, so the probe stays cheap
    px, py = probe_windows(sources, whitelist, context, probe_limit)
    wl, margins = whitelist_metrics(full, quant, px, py, whitelist)
    report = {"whitelist": {"tokens": list(whitelist.strings), "ids": list(whitelist.ids)},
              "whitelisted": wl,
              "val": val_metrics(full, quant, val_windows(sources, seq_len, val_windows_per_source), whitelist),
              "json_validity": json_validity(full, quant, tokenizer, json_prompts)}
    if keep_margins:
        report["margins"] = margins
    return report


def survival_report(checkpoint: str | Path, fmt: str, tokens: list[str] | None = None, embeddings: str = "quantize",
                    json_prompts: int = 4, probe_limit: int = 256, val_windows_per_source: int = 16,
                    keep_margins: bool = False, splice_rounding: str = "auto") -> dict:
    """Load a checkpoint, fake-quantize it under `fmt` as `felix quantize` packs it, and compare (see `compare`).

    With applied splices (CHECKPOINT/splices/) both sides are the model as edited: full precision with the
    stack applied unrounded, against what `felix quantize --splice-rounding splice_rounding` packs from it
    (`felix.splice_pack.spliced_state`: by default SpliceCore GPTQ-rounded for the codebook formats, plainly
    for q8_0/q4_0); the report's "splices" says what was applied (None without a stack).
    """
    resolve_splice_rounding(splice_rounding, fmt)  # an impossible gptq is refused before the model loads
    model, tokenizer, ckpt = load_model(checkpoint)
    if ckpt.quant_format:  # it loads dequantized: "full precision" would already be the quantized model
        source = ckpt.trainer_state["quantized"].get("source")
        raise FelixError(f"{ckpt.path}: a `felix quantize` artifact ({ckpt.quant_format}) has no full-precision "
                         f"weights to compare; give the checkpoint it was made from"
                         + (f" ({source})" if source else ""))
    strings = tokens or ckpt.config.quail.tokens
    if not strings:
        raise FelixError(f"{ckpt.path}: its config has no quail.tokens; name the whitelist with --tokens")
    whitelist = resolve_whitelist(tokenizer, list(strings), "--tokens" if tokens else "quail.tokens")
    mix = checkpoint_mix(ckpt, "its val split is what survival measures on")
    packed_source, splices = model, None
    stack = PatchStack.open(ckpt.path)
    if len(stack):
        state, _, splices = spliced_state(stack, fmt, splice_rounding, embeddings)
        stack.restore(model)
        packed_source = copy.deepcopy(model)
        packed_source.load_state_dict(state)
        del state
    quant = fake_quantize_model(packed_source, fmt, embeddings).eval()
    del packed_source
    report = compare(model, quant, tokenizer, whitelist, mix, ckpt.config.train.seq_len,
                     val_windows_per_source, probe_limit, json_prompts, keep_margins)
    step = (ckpt.trainer_state or {}).get("step")
    return {"checkpoint": str(ckpt.path), "format": fmt, "embeddings": embeddings, "step": step,
            "splices": splices} | report


@torch.no_grad()
def probe_refusal(model: torch.nn.Module, tokenizer: FelixTokenizer, fmt: str, refuse_prompts: list[str],
                  ordinary_prompts: list[str], tokens: list[str]) -> dict:
    """Refusal rates on explicit prompt lists: `refuse_prompts` should be refused (greedy next token
    whitelisted), `ordinary_prompts` should not (false refusals). Full and quantized under `fmt`; an empty
    list's rates are None. A prompt longer than the model's context keeps its last tokens (the next-token
    decision lives there)."""
    whitelist = resolve_whitelist(tokenizer, tokens)
    limit = model.cfg.max_seq_len
    quant = fake_quantize_model(model, fmt).eval()
    out = {}
    for kind, prompts in (("refuse", refuse_prompts), ("ordinary", ordinary_prompts)):
        hits = {"full": 0, "quant": 0}
        agree = 0
        for p in prompts:
            ids = tokenizer.encode(p)
            if not ids:
                raise FelixError(f"{kind} prompt {p!r} encodes to no tokens: there is no next token to probe")
            x = torch.tensor([ids[-limit:]], dtype=torch.long)
            top = {name: int(m.lm_head(m.final_hidden(x)[:, -1]).argmax()) for name, m in
                   (("full", model), ("quant", quant))}
            for name, t in top.items():
                hits[name] += int(t in whitelist.ids)
            agree += int(top["full"] == top["quant"])
        n = len(prompts)
        out[kind] = {"prompts": n, "refusal_rate_full": hits["full"] / n if n else None,
                     "refusal_rate_quant": hits["quant"] / n if n else None,
                     "top1_agreement": agree / n if n else None}
    return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_plot_path(path: str | Path, checkpoint: str | Path | None = None, what: str = "--plot") -> Path:
    """FelixError, before any work, unless `path` can take the margin plot: its directory exists and is
    writable, it is not in `checkpoint`, and what is there already is a PNG (an earlier plot is replaced,
    any other file kept)."""
    path = check_output(path, what, directory=False, make_parents=False)
    if checkpoint is not None:
        check_apart(path, checkpoint, what)
    if path.exists():
        try:
            with path.open("rb") as f:
                head = f.read(len(PNG_SIGNATURE))
        except OSError as exc:
            raise FelixError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
        if head != PNG_SIGNATURE:
            raise FelixError(f"{what} {path} exists and is not a PNG file; refusing to replace it")
    return path


def plot_margins(margins: dict[str, dict[str, list[float]]], path: str | Path, title: str = "") -> Path | None:
    """Histograms of whitelisted-position margins, full vs quantized, one panel per model; None if empty.
    An existing file at `path` that is not a PNG is refused (FelixError); a symlink is written through."""
    path = check_plot_path(path)
    panels = {k: v for k, v in margins.items() if v.get("full")}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, (name, m) in zip(axes[0], panels.items(), strict=True):
        lo = min(min(m["full"]), min(m["quant"]))
        hi = max(max(m["full"]), max(m["quant"]))
        bins = np.linspace(lo, hi, MARGIN_BINS)
        ax.hist(m["full"], bins=bins, alpha=0.55, label="full precision")
        ax.hist(m["quant"], bins=bins, alpha=0.55, label="quantized")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("margin z_target - max other")
    axes[0][0].set_ylabel("whitelisted positions")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:  # resolved: a symlink is written through, as `felix quantize` and the exports write theirs
        with atomic_path(path.resolve()) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    except OSError as exc:  # checked before the work; what changed since (a full disk) is still named
        raise FelixError(f"--plot {path}: cannot write the plot ({exc})") from None
    finally:
        plt.close(fig)
    return path
