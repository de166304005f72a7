"""Edit examples as token ids, and the measurements every splice method and report shares.

An `Example` is a context followed by the completion it should produce. "Success" everywhere is
`greedy_hits`: greedy decoding yields exactly the completion, checked by teacher forcing. The budget, the
CLI, the bench and the methods read the model through these functions, so they share one definition.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from felix.errors import FelixError
from felix.model import FelixLM


@dataclass(frozen=True)
class Example:
    """Token ids; ids[:n_prompt] are the context, the rest the completion it should be followed by."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def target(self) -> tuple[int, ...]:
        return self.ids[self.n_prompt:]


def make_example(tok, prompt: str, target: str, max_len: int) -> Example:
    """Prompt and target tokenized separately and concatenated, the prompt cut from the left to fit `max_len`."""
    p, t = tok.encode(prompt), tok.encode(target)
    if not p or not t:
        raise FelixError("prompt and target must both encode to at least one token")
    if len(t) >= max_len:
        raise FelixError(f"target is {len(t)} tokens; the model's context of {max_len} needs room for at least one "
                         f"prompt token")
    p = p[-(max_len - len(t)):]  # keep the end of an over-long prompt: the next-token decision lives there
    return Example(tuple(p + t), len(p))


def contradicted(ex: Example, others: list[Example]) -> int | None:
    """The index of the first of `others` that wants another token than `ex` after the same tokens (both cannot
    be greedy at once: an edit of a fact already edited otherwise), or None."""
    wanted = {ex.ids[:j]: ex.ids[j] for j in range(ex.n_prompt, len(ex.ids))}
    for i, o in enumerate(others):
        if any(wanted.get(o.ids[:j], o.ids[j]) != o.ids[j] for j in range(o.n_prompt, len(o.ids))):
            return i
    return None


def prompt_ids(tok, text: str, max_len: int) -> list[int]:
    """A prompt's token ids cut from the left to `max_len - 1`: the next-token decision lives at its end, and
    one position is left for a continuation (neutral and preservation prompts are continued greedily)."""
    return tok.encode(text)[-(max_len - 1):]


def batch_examples(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, labels, lengths): right-padded ids; labels[t] = ids[t+1] on completion positions, else -100."""
    T = max(len(e.ids) for e in examples)
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, e.n_prompt - 1 : len(e.ids) - 1] = torch.tensor(e.ids[e.n_prompt:])
    return idx.to(device), labels.to(device), torch.tensor([len(e.ids) for e in examples])


def model_device(model: FelixLM) -> torch.device:
    return model.tok_emb.weight.device


def completion_nll(model: FelixLM, examples: list[Example]) -> torch.Tensor:
    """Mean NLL of the completion tokens (differentiable)."""
    idx, labels, _ = batch_examples(examples, model_device(model))
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
        idx, labels, _ = batch_examples(examples[s : s + chunk], model_device(model))
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
            idx, _, lengths = batch_examples([Example(tuple(rows[i]), len(rows[i])) for i in live], model_device(model))
            nxt = model(idx)[torch.arange(len(live)), lengths - 1].argmax(-1).tolist()
            for i, t in zip(live, nxt, strict=True):
                rows[i].append(int(t))
        out += [tuple(r[len(p):]) for r, p in zip(rows, prompts[s : s + chunk], strict=True)]
    return out


def next_token_logprobs(model: FelixLM, prompts: list[list[int]]) -> torch.Tensor:
    """(N, vocab) log-probabilities of the next token after each prompt, in one batch (differentiable)."""
    part = [Example(tuple(p), len(p)) for p in prompts]
    idx, _, lengths = batch_examples(part, model_device(model))
    return torch.log_softmax(model(idx)[torch.arange(len(part)), lengths - 1].float(), -1)


@torch.no_grad()
def last_logprobs(model: FelixLM, prompts: list[list[int]], chunk: int = 64) -> torch.Tensor:
    """`next_token_logprobs`, `chunk` prompts at a time and without gradients."""
    return torch.cat([next_token_logprobs(model, prompts[s : s + chunk]) for s in range(0, len(prompts), chunk)])


def kl_rows(base_lp: torch.Tensor, cur_lp: torch.Tensor) -> torch.Tensor:
    """KL(base || current) per row, from log-probabilities."""
    return (base_lp.exp() * (base_lp - cur_lp)).sum(-1)


@contextmanager
def grads_only_for(model: FelixLM, params: list[torch.nn.Parameter]):
    """Let backward compute gradients for `params` alone (the frozen rest costs nothing); restore after,
    the `.grad` of every parameter included (a caller's accumulated gradients survive an edit)."""
    saved = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, (flag, grad) in saved.items():
            p.requires_grad_(flag)
            p.grad = grad


def edit_layers(model: FelixLM, layers: list[int]) -> list[int]:
    """`layers` each once, ascending (a later layer's keys are read after the lower layers' update); a layer
    without a SpliceCore is an error that names it."""
    cores = model.splice_cores()
    if bad := sorted({L for L in layers if L not in cores}):
        raise FelixError(f"layers {bad} have no SpliceCore (the model has SpliceCore at layers {sorted(cores)})")
    return sorted(set(layers))


def splice_names(layers: list[int], keys: tuple[str, ...] = ("a", "b")) -> list[str]:
    """The state-dict names of the SpliceCore tensors `keys` of `layers`."""
    return [f"layers.{L}.mlp.splice.{k}" for L in layers for k in keys]


def last_position_examples(prompts: list[list[int]]) -> list[Example]:
    """Each prompt with its last position as its one completion-predicting position: how a prompt's key is
    kept when only its next token matters (the label is never read)."""
    return [Example((*p, 0), len(p)) for p in prompts]
