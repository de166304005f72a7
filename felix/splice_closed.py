"""The closed-form edits: MEMIT/AlphaEdit-style least squares on one SpliceCore factor.

Both find the wanted change of each chosen layer's MLP output at the target-predicting positions as
ROME/MEMIT find v*: Adam on a free vector added to that output, stopped once the target wins by the
margin. They differ in which factor they solve for.

`closed_form` writes `b`. Its keys are k = a u (u = the down-projection input), r-dimensional; Δb solves
g Δb K ≈ R while protecting preserved keys (corpus text, covariance C0) and earlier edits' keys K_p:

- ridge (MEMIT):      Δb = R K1ᵀ (λ C0 + w K_p K_pᵀ + K1 K1ᵀ)⁻¹ / g
- nullspace (AlphaEdit): P projects on C0's eigenvectors with eigenvalue < tol·max;
                      Δb = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + μI)⁻¹ P / g, so Δb C0-directions are untouched.

`closed_form_a` writes `a`. Its keys are u itself, d_ff-dimensional, so an edit can be told apart from
the preserved text even though the surface has rank r; the price is that the output change must lie in
span(g B), so the wanted change is searched there: R = Q z with Q an orthonormal basis of g B, and the
codes D (r per position) solve g B D = Q z. With C = E[u uᵀ] over the preservation text (given
preservation prompts, plus their last tokens' moment: `with_prompt_moment`) plus a ridge λ·tr(C)/d_ff,
K = [K1 K_p] (K_p: earlier edits' keys, the request's neutral prompts', with `text_pins` the training-text
positions the write would reach most (felix.splice_pins), and with `prompt_repair` the preservation prompts an
earlier solve of this write changed the next token of, or with `prompt_repair_drop` took that much lead from)
and V = [D 0]:

    Δa = V (Kᵀ C⁻¹ K + μI)⁻¹ Kᵀ C⁻¹

the least-C-energy update (smallest mean change over preserved tokens, as ROME's C⁻¹k) that writes D
exactly at the edit's keys and nothing at earlier edits' keys. Because the change at the edit's own
positions is exactly D, the edited model reproduces the searched change, and earlier edits keep theirs.
Δa has a's shape, so the surface stays g B a: still one llama.cpp LoRA.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from felix.model import FelixLM
from felix.splice_edit import (
    EditConfig,
    EditContext,
    Example,
    _batch,
    _device,
    grads_only_for,
    greedy_continuations,
    greedy_hits,
    splice_names,
    targets_win,
)
from felix.splice_next_tokens import NextTokenCheck
from felix.splicecore import splice_tensor_layer


def _down_inputs(model: FelixLM, layers: list[int], idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """u, the input of each layer's down-projection (and SpliceCore), for token ids idx: (B, T, d_ff).

    Only the blocks up to the last of `layers` run: no later block and no head.
    """
    us: dict[int, torch.Tensor] = {}
    hooks = [model.layers[L].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, L=L: us.__setitem__(L, args[0].detach().float())) for L in layers]
    try:
        with torch.no_grad():
            model.residual_through(idx.to(_device(model)), max(layers))
    finally:
        for h in hooks:
            h.remove()
    return us


def inputs_at_targets(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """u at every completion-predicting position, per layer: (d_ff, n_positions)."""
    if not examples:
        return {L: torch.zeros(model.cfg.d_ff, 0) for L in layers}
    idx, labels, _ = _batch(examples, _device(model))
    us = _down_inputs(model, layers, idx)
    pos = (labels != -100).cpu()
    return {L: us[L].cpu()[pos].t() for L in layers}


def _keys(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """k = a u at every completion-predicting position, per layer: (r, n_positions)."""
    cores = model.splice_cores()
    return {L: cores[L].a.detach().float().cpu() @ u for L, u in inputs_at_targets(model, layers, examples).items()}


COVARIANCE_CHUNK = 32  # preservation windows per forward pass: memory stays flat however many there are


def _second_moment(model: FelixLM, layers: list[int], preserve: torch.Tensor,
                   project: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """E[x xᵀ] per layer over every position of the preservation windows, on the CPU, where x is u or,
    with `project[L]` (m x d_ff), project[L] @ u. Sums run on the model's device, chunk by chunk."""
    sums: dict[int, torch.Tensor] = {}
    n = 0
    for chunk in preserve.split(COVARIANCE_CHUNK):
        for L, u in _down_inputs(model, layers, chunk).items():
            x = u.flatten(0, 1)
            if project is not None:
                x = x @ project[L].to(x.device, x.dtype).t()
            sums[L] = sums[L] + x.t() @ x if L in sums else x.t() @ x
        n += chunk.numel()
    return {L: (c / n).cpu() for L, c in sums.items()}


def input_covariance(model: FelixLM, layers: list[int], preserve: torch.Tensor) -> dict[int, torch.Tensor]:
    """E[u uᵀ] of the down-projection inputs over preservation text, per layer (d_ff x d_ff)."""
    return _second_moment(model, layers, preserve)


class BottomUpCovariances:
    """`input_covariance` of one layer after another, bottom up, for a pass that rewrites each layer's
    SpliceCore before asking for the next (GPTQ folding): every layer reads its inputs through the layers
    below as they are by then.

    Each preservation chunk's residual stream is carried up the model, so every block runs once: a fresh
    `input_covariance` per layer runs all the blocks below it again (84 block passes instead of 24 at
    felix-300m's 6 SpliceCore layers). The figures are bit for bit `input_covariance`'s: the same chunks
    go through the same operations in the same order. Memory: one d_model residual per preservation token.

    `entering` (per chunk, the residual stream entering block `start`, as an earlier walk recorded it)
    starts the walk at block `start` instead of the embeddings; `record` keeps, per layer asked for, the
    residual stream entering its block (on the CPU, in `self.entering`), which is what a later walk resumes
    from. A resumed walk gives bit for bit the figures of a whole one over the same blocks below `start`.
    """

    def __init__(self, model: FelixLM, preserve: torch.Tensor, entering: list[torch.Tensor] | None = None,
                 start: int = 0, record: bool = False):
        self.model, self.chunks = model, list(preserve.split(COVARIANCE_CHUNK))
        self.n_tokens = preserve.numel()
        if (entering is None) != (start == 0) or entering is not None and len(entering) != len(self.chunks):
            raise ValueError("a walk starting above block 0 needs one entering residual per preservation chunk")
        dev = _device(model)
        # per chunk: the residual entering block `self.next`
        self.states = None if entering is None else [x.to(dev) for x in entering]
        self.next = start
        self.attended = False  # whether `states` already went through block `self.next`'s attention
        self.entering: dict[int, list[torch.Tensor]] | None = {} if record else None

    def _start(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Check that `layer` is still ahead; embed the chunks if no block ran yet; the RoPE tables."""
        if layer < self.next or layer == self.next and self.attended:
            raise ValueError(f"layer {layer} was already passed (bottom-up order)")
        model = self.model
        if self.states is None:
            self.states = [model.tok_emb(c.to(_device(model))) for c in self.chunks]
        n = self.chunks[0].shape[1]
        return model.rope_cos[:n], model.rope_sin[:n]

    def _enter(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One chunk's stream carried from where the walk stands to the entrance of block `layer`."""
        for j in range(self.next, layer):
            block = self.model.layers[j]
            if not (j == self.next and self.attended):
                x = block.attend(x, cos, sin)
            x = x + block.mlp(block.mlp_norm(x))
        return x

    @torch.no_grad()
    def streams(self, layers: list[int]) -> dict[int, list[torch.Tensor]]:
        """The residual stream entering each of `layers`' blocks (ascending, not yet passed), per chunk, on the
        CPU: what a walk recording at those layers keeps, by the same arithmetic, with no covariance."""
        out: dict[int, list[torch.Tensor]] = {}
        for layer in layers:
            cos, sin = self._start(layer)
            self.states = [self._enter(x, layer, cos, sin) for x in self.states]
            self.next, self.attended = layer, False
            out[layer] = [x.to("cpu", copy=True) for x in self.states]
        return out

    @torch.no_grad()
    def covariance(self, layer: int) -> torch.Tensor:
        """E[u uᵀ] at `layer` (d_ff x d_ff, on the CPU); layers must be asked for in ascending order."""
        cos, sin = self._start(layer)
        block = self.model.layers[layer]
        if self.entering is not None:
            self.entering[layer] = []
        total = None
        for i, x in enumerate(self.states):
            x = self._enter(x, layer, cos, sin)
            if self.entering is not None:
                self.entering[layer].append(x.to("cpu", copy=True))
            x = block.attend(x, cos, sin)  # `_start` refused a layer whose attention already ran
            self.states[i] = x
            u = block.mlp.down_input(block.mlp_norm(x)).float().flatten(0, 1)
            total = u.t() @ u if total is None else total + u.t() @ u
        self.next, self.attended = layer, True
        return (total / self.n_tokens).cpu()


class InputCovariances:
    """`input_covariance` over fixed preservation windows, kept per layer until it can have changed.

    u at layer L is computed from the residual stream entering L, so it depends on the SpliceCores of the
    layers below L and not on L's own: an edit that writes layer L (or above) leaves L's covariance as it
    was. Each entry is keyed by a digest of the SpliceCore tensors below its layer (and the model), and a
    miss recomputes every missing layer in one forward pass: bit for bit what `input_covariance` gives.

    With `prompts` (token ids) and a positive `prompt_weight` w, each entry is the text's C plus the prompts'
    moment N (`prompt_moment`) scaled to w·tr C: `with_prompt_moment` (EXP-46ah). With `prompt_tokens` n > 1,
    N also covers the positions predicting each prompt's 2nd..nth greedy tokens, generated once, by the
    model as it is at the first `get` (the behaviour to keep), so the entries stay keyed by the layers below.
    """

    def __init__(self, preserve: torch.Tensor, prompts: Sequence[Sequence[int]] = (), prompt_weight: float = 0.0,
                 prompt_tokens: int = 1):
        if prompt_weight < 0:
            raise ValueError(f"prompt_weight must be 0 or more, got {prompt_weight}")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be at least 1, got {prompt_tokens}")
        self.preserve = preserve
        self.prompts = [list(p) for p in prompts if p] if prompt_weight > 0 else []
        self.prompt_weight = prompt_weight
        self.prompt_tokens = prompt_tokens
        self.continuations: list[tuple[int, ...]] | None = None  # set at the first get when prompt_tokens > 1
        self._entries: dict[int, tuple[bytes, torch.Tensor]] = {}
        self.computed = 0  # layers computed so far (misses)

    @staticmethod
    def _below(model: FelixLM, state: dict[str, torch.Tensor], layer: int) -> bytes:
        h = hashlib.blake2b(str(id(model)).encode(), digest_size=16)
        for name, t in sorted(state.items()):
            if splice_tensor_layer(name) < layer:
                h.update(name.encode())
                h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    def get(self, model: FelixLM, layers: list[int]) -> dict[int, torch.Tensor]:
        state = model.splice_state()
        keys = {L: self._below(model, state, L) for L in layers}
        missing = [L for L in layers if self._entries.get(L, (None,))[0] != keys[L]]
        if missing:
            covs = input_covariance(model, missing, self.preserve)
            if self.prompts:
                if self.prompt_tokens > 1 and self.continuations is None:
                    self.continuations = greedy_continuations(model, self.prompts, self.prompt_tokens)
                moments = prompt_moment(model, missing, self.prompts, self.continuations)
                covs = {L: with_prompt_moment(c, moments[L], self.prompt_weight) for L, c in covs.items()}
            for L, c in covs.items():
                self._entries[L] = (keys[L], c)
            self.computed += len(missing)
        return {L: self._entries[L][1] for L in layers}


PROMPT_CHUNK = 256  # preservation prompts per forward pass


def prompt_moment(model: FelixLM, layers: list[int], prompts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]] | None = None) -> dict[int, torch.Tensor]:
    """E[u uᵀ] per layer over the last token of each prompt (token ids): the inputs a prompt's next token
    is read from, as an edit's own key and the neighbours a user asks about are.

    With `continuations` (the prompts' next tokens and those after them), the mean of that moment and the one
    over the positions predicting the later tokens: a prompt's next token weighs as much as the rest of its
    answer. A moment of next-token inputs alone pushes the write into the answers' positions (EXP-46ak).
    """
    first = _moment(model, layers, last_position_examples([list(p) for p in prompts]))
    if continuations is None:
        return first
    later = [Example((*p, *c), len(p) + 1) for p, c in zip(prompts, continuations, strict=True) if len(c) > 1]
    if not later:
        return first
    rest = _moment(model, layers, later)
    return {L: (first[L] + rest[L]) / 2 for L in layers}


def _moment(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """E[u uᵀ] per layer over every completion-predicting position of `examples`, PROMPT_CHUNK at a time."""
    sums: dict[int, torch.Tensor] = {L: torch.zeros(model.cfg.d_ff, model.cfg.d_ff) for L in layers}
    for i in range(0, len(examples), PROMPT_CHUNK):
        for L, u in inputs_at_targets(model, layers, examples[i : i + PROMPT_CHUNK]).items():
            sums[L] += u @ u.t()
    n = sum(len(e.ids) - e.n_prompt for e in examples)
    return {L: c / max(n, 1) for L, c in sums.items()}


def with_prompt_moment(cov: torch.Tensor, moment: torch.Tensor, weight: float) -> torch.Tensor:
    """C + w·(tr C / tr N)·N: the text's input moments with the prompts' moment N added at w times their
    total energy. Short prompts' last tokens are a corner of input space that 128-token windows seldom
    visit, so C alone weighs directions shared by every prompt of a kind as if no text used them."""
    scale = weight * float(cov.trace()) / max(float(moment.trace()), 1e-30)
    return cov + scale * moment


def preserved_covariance(model: FelixLM, layers: list[int], preserve: torch.Tensor) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the SpliceCore keys over preservation text, per layer (r x r)."""
    cores = model.splice_cores()
    return _second_moment(model, layers, preserve, {L: cores[L].a.detach().float() for L in layers})


def _wanted_changes(model: FelixLM, ex: Example, layers: list[int], cfg: EditConfig,
                    basis: dict[int, torch.Tensor] | None = None,
                    positions: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Coordinates z (m, n_positions) per layer such that adding basis·z to the layer's MLP output at
    `positions` (default: the completion-predicting ones) makes every target token win by `cfg.margin`;
    basis None means the identity (m = d).

    Adam on the target's cross-entropy, stopped as soon as the margin holds: the smallest change that
    does the job leaks least. There is no L2 penalty: 1e-3·|z|² stalled the search far short of the
    changes a counterfactual needs at demo scale (norms of 50–500 against MLP outputs of 10–170).
    """
    positions = positions if positions is not None else list(range(ex.n_prompt - 1, len(ex.ids) - 1))
    n = len(positions)
    dev = _device(model)
    basis = None if basis is None else {L: b.to(dev) for L, b in basis.items()}
    dims = {L: model.cfg.d_model if basis is None else basis[L].shape[1] for L in layers}
    coords = {L: torch.zeros(n, dims[L], device=dev, requires_grad=True) for L in layers}
    hooks = []
    for L in layers:
        def add(_m, _args, out, L=L):
            delta = coords[L] if basis is None else coords[L] @ basis[L].t()
            out = out.clone()
            out[0, positions] = out[0, positions] + delta.to(out.dtype)
            return out
        hooks.append(model.layers[L].mlp.register_forward_hook(add))
    opt = torch.optim.Adam(list(coords.values()), lr=cfg.delta_lr)
    idx, labels, _ = _batch([ex], dev)
    try:
        with grads_only_for(model, []):
            for _ in range(cfg.delta_steps):
                logits = model(idx).float()
                if targets_win(logits, labels, cfg.margin):
                    break
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for h in hooks:
            h.remove()
    return {L: v.detach().cpu().t() for L, v in coords.items()}


def _null_projector(cov: torch.Tensor, tol: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov.double())
    keep = evecs[:, evals < tol * evals.max().clamp(min=1e-30)]
    return (keep @ keep.t()).float()


def closed_form(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext, cfg: EditConfig,
                cov: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Least-squares update of `b` in `layers` (keys a·u), protecting preserved and earlier keys."""
    names = splice_names(layers, ("b",))
    before = {k: v for k, v in model.splice_state().items() if k in names}
    cores = model.splice_cores()
    cov = cov or preserved_covariance(model, layers, ctx.preserve)
    try:
        for _ in range(cfg.rounds):
            if all(greedy_hits(model, [ex])):
                break
            wanted = _wanted_changes(model, ex, layers, cfg)
            for L in layers:  # in order: a later layer's keys see the earlier layers' update
                k1 = _keys(model, [L], [ex])[L]
                kp = _keys(model, [L], ctx.prior)[L]
                r = k1.shape[0]
                g = float(cores[L].gate)
                if g == 0:
                    continue
                R = wanted[L] / g
                if cfg.protect == "nullspace":
                    P = _null_projector(cov[L], cfg.null_tol)
                    M = kp @ kp.t() @ P + k1 @ k1.t() @ P + 1e-4 * torch.eye(r)
                    db = (R @ k1.t() @ P @ torch.linalg.inv(M)) @ P
                else:
                    M = cfg.ridge * cov[L] + cfg.prior_weight * kp @ kp.t() + k1 @ k1.t()
                    db = torch.linalg.solve(M + 1e-6 * torch.eye(r), (R @ k1.t()).t()).t()
                with torch.no_grad():
                    cores[L].b.add_(db.to(cores[L].b.device, cores[L].b.dtype))
        after = {n: v.clone() for n, v in model.splice_state().items() if n in names}
    finally:
        model.load_splice_state(before, strict=False)
    return after


def regularized_covariance(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """C + ridge·tr(C)/d_ff·I in float64: the covariance closed_form_a's least-energy writes are measured in."""
    f = cov.shape[0]
    return cov.double() + ridge * float(cov.trace()) / f * torch.eye(f, dtype=torch.float64)


def solve_a_update(codes: torch.Tensor, k_edit: torch.Tensor, k_prior: torch.Tensor, cov: torch.Tensor,
                   ridge: float, mu: float = 1e-6) -> torch.Tensor:
    """Δa (r x d_ff) with Δa k_edit ≈ codes, Δa k_prior ≈ 0, and the least energy Δa C Δaᵀ.

    C is regularized by `ridge`·tr(C)/d_ff; μ (relative to the Gram diagonal) keeps near-duplicate keys
    from blowing the solution up.
    """
    c = regularized_covariance(cov, ridge)
    keys = torch.cat([k_edit, k_prior], dim=1).double()
    values = torch.cat([codes.double(), torch.zeros(codes.shape[0], k_prior.shape[1], dtype=torch.float64)], dim=1)
    cinv_k = torch.linalg.solve(c, keys)
    gram = keys.t() @ cinv_k
    gram = gram + mu * gram.diagonal().mean().clamp(min=1e-30) * torch.eye(gram.shape[0], dtype=torch.float64)
    return (values @ torch.linalg.solve(gram, cinv_k.t())).float()


def last_position_examples(prompts: list[list[int]]) -> list[Example]:
    """Each prompt with its last position as its one completion-predicting position: how a prompt's key is
    kept when only its next token matters (the label is never read)."""
    return [Example((*p, 0), len(p)) for p in prompts]


def _protected_neutral(model: FelixLM, ctx: EditContext, cfg: EditConfig) -> list[Example]:
    """The neutral prompts whose keys closed_form_a keeps: the request's own (`protect_neutral`) and the
    applied edits' (`protect_suite`), each at the positions predicting its first `neutral_tokens` greedy
    tokens (as the model is now)."""
    prompts = [*(ctx.neutral if cfg.protect_neutral else []), *(ctx.suite if cfg.protect_suite else [])]
    prompts = [list(p) for p in dict.fromkeys(tuple(p) for p in prompts if p)]
    if not prompts:
        return []
    if cfg.neutral_tokens <= 1:  # the last prompt position alone: the label is never read
        return last_position_examples(prompts)
    conts = greedy_continuations(model, prompts, cfg.neutral_tokens)
    return [Example((*p, *c), len(p)) for p, c in zip(prompts, conts, strict=True)]


def closed_form_a(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext, cfg: EditConfig,
                  cov: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Least-energy update of `a` in `layers` (keys u, values in span(gate·b)), earlier edits' keys kept."""
    layers = sorted(layers)  # ascending: a later layer's keys are read after the earlier layers' update
    names = splice_names(layers, ("a",))
    before = {k: v for k, v in model.splice_state().items() if k in names}
    cores = model.splice_cores()
    layers = [L for L in layers if float(cores[L].gate) != 0]
    if cov is None:
        cov = ctx.covariances.get(model, layers) if ctx.covariances else input_covariance(model, layers, ctx.preserve)
    prompts = ctx.preserve_prompts if cfg.prompt_repair and layers else []
    # the write changes no stream below its lowest layer, so the prompts' re-check starts there
    check = NextTokenCheck(model, prompts, layers[0]) if prompts else None
    next0, lead0 = check.read() if check else ([], None)  # each prompt's next token before the edit, its lead
    repaired: list[Example] = []
    kept: set[int] = set()  # the prompts in `repaired`
    drop = cfg.prompt_repair_drop
    search = None  # the first round's wanted change: every attempt starts from the same prior state
    try:
        for attempt in range(1 + (cfg.prompt_repair if prompts else 0)):
            if attempt:
                model.load_splice_state(before, strict=False)
            search = _write_a(model, ex, layers, ctx, cfg, cov, repaired, search)
            if check is None:
                break
            now, lead = check.read(next0)
            lost = (lead0 - lead).tolist()
            # a kept prompt can still move (through its earlier positions, on a write to two layers); keeping
            # it twice would only weigh its key more in the ridge
            moved = [i for i in range(len(prompts)) if i not in kept and (
                now[i] != next0[i] or drop is not None and lost[i] >= drop)]
            if not moved:
                break
            # the write is solved again from the prior state with these prompts' keys kept exactly
            kept.update(moved)
            repaired += last_position_examples([list(prompts[i]) for i in moved])
        after = {n: v.clone() for n, v in model.splice_state().items() if n in names}
    finally:
        model.load_splice_state(before, strict=False)
    return after


def _write_a(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext, cfg: EditConfig,
             cov: dict[int, torch.Tensor], kept: list[Example],
             first: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
    """closed_form_a's rounds, written into the model's `a`: each round searches the wanted change and
    solves the least-energy Δa that writes it, keeping earlier edits', neutral and `kept` keys. `first`: the
    first round's search, made earlier from this same state; returned (None if no round ran)."""
    cores = model.splice_cores()
    for r in range(cfg.rounds):
        if not layers or all(greedy_hits(model, [ex])):
            break
        gb = {L: (cores[L].gate * cores[L].b).detach().float().cpu() for L in layers}
        bases = {L: torch.linalg.qr(gb[L]).Q for L in layers}
        z = first if r == 0 and first is not None else _wanted_changes(model, ex, layers, cfg, basis=bases)
        if r == 0:
            first = z
        neutral = _protected_neutral(model, ctx, cfg)
        for L in layers:
            codes = torch.linalg.lstsq(gb[L], bases[L] @ z[L]).solution  # g B D = Q z
            # the same codes at the prompt's variants (same target, so as many positions each)
            k1 = inputs_at_targets(model, [L], [ex, *ctx.variants])[L]
            kp = inputs_at_targets(model, [L], ctx.prior + neutral + kept)[L]
            if cfg.text_pins:  # k1[:, 0]: the key predicting the first target token
                if ctx.pins is None:
                    raise ValueError("text_pins needs the pin search in the edit context (EditContext.pins)")
                kp = torch.cat([kp, ctx.pins.select(model, L, k1[:, 0], cov[L], cfg.a_ridge, cfg.text_pins,
                                                    ctx.pin_exclude)], dim=1)
            da = solve_a_update(codes.repeat(1, 1 + len(ctx.variants)), k1, kp, cov[L], cfg.a_ridge)
            with torch.no_grad():
                cores[L].a.add_(da.to(cores[L].a.device, cores[L].a.dtype))
    return first
