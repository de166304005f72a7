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

import torch
import torch.nn.functional as F

from felix.errors import FelixError
from felix.model import FelixLM
from felix.splice_config import EditConfig, EditContext
from felix.splice_covariance import input_covariance, inputs_at_targets, preserved_covariance
from felix.splice_examples import (
    Example,
    batch_examples,
    edit_layers,
    grads_only_for,
    greedy_continuations,
    greedy_hits,
    last_position_examples,
    model_device,
    splice_names,
    targets_win,
)
from felix.splice_next_tokens import NextTokenCheck


def _keys(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """k = a u at every completion-predicting position, per layer: (r, n_positions)."""
    cores = model.splice_cores()
    return {L: cores[L].a.detach().float().cpu() @ u for L, u in inputs_at_targets(model, layers, examples).items()}


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
    dev = model_device(model)
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
    idx, labels, _ = batch_examples([ex], dev)
    try:
        with grads_only_for(model, []), torch.enable_grad():  # a caller's no_grad would leave nothing to step
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
    if cfg.protect not in ("ridge", "nullspace"):
        raise FelixError(f"edit config: protect must be ridge or nullspace, got {cfg.protect!r}")
    layers = edit_layers(model, layers)  # ascending: a later layer's keys are read after the lower layers' update
    names = splice_names(layers, ("b",))
    before = {k: v for k, v in model.splice_state().items() if k in names}
    cores = model.splice_cores()
    layers = [L for L in layers if float(cores[L].gate) != 0]  # a gate-0 layer carries no share of the change
    cov = cov or preserved_covariance(model, layers, ctx.preserve)
    try:
        for _ in range(cfg.rounds):
            if not layers or all(greedy_hits(model, [ex])):
                break
            wanted = _wanted_changes(model, ex, layers, cfg)
            for L in layers:
                k1 = _keys(model, [L], [ex])[L]
                kp = _keys(model, [L], ctx.prior)[L]
                db = solve_b_update(wanted[L], k1, kp, cov[L], cfg) / float(cores[L].gate)
                with torch.no_grad():
                    cores[L].b.add_(db.to(cores[L].b.device, cores[L].b.dtype))
        after = {n: v.clone() for n, v in model.splice_state().items() if n in names}
    finally:
        model.load_splice_state(before, strict=False)
    return after


def solve_b_update(wanted: torch.Tensor, k_edit: torch.Tensor, k_prior: torch.Tensor, cov: torch.Tensor,
                   cfg: EditConfig) -> torch.Tensor:
    """gate·Δb (d x r) with gate·Δb k_edit ≈ `wanted`, protecting `cov`'s keys and `k_prior` (cfg.protect).

    μ is relative to the keys' scale tr(C₀)/r (activations are not normalized): an absolute μ damped every
    write of small keys to nothing and vanished beside large ones, so rescaling a by s and b by 1/s (the same
    model) changed the edit; now Δb scales by 1/s.
    """
    r = k_edit.shape[0]
    key_scale = max(float(cov.trace()) / r, 1e-30) * torch.eye(r)
    if cfg.protect == "nullspace":
        P = _null_projector(cov, cfg.null_tol)
        M = k_prior @ k_prior.t() @ P + k_edit @ k_edit.t() @ P + 1e-4 * key_scale
        return (wanted @ k_edit.t() @ P @ torch.linalg.inv(M)) @ P
    M = cfg.ridge * cov + cfg.prior_weight * k_prior @ k_prior.t() + k_edit @ k_edit.t()
    return torch.linalg.solve(M + 1e-6 * key_scale, (wanted @ k_edit.t()).t()).t()


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
    # a prompt of max_seq_len tokens has no room to continue: its last position alone (label 0, never read)
    room = [p for p in prompts if len(p) < model.cfg.max_seq_len]
    conts = dict(zip(map(tuple, room), greedy_continuations(model, room, cfg.neutral_tokens), strict=True))
    return [Example((*p, *conts.get(tuple(p), (0,))), len(p)) for p in prompts]


def closed_form_a(model: FelixLM, ex: Example, layers: list[int], ctx: EditContext, cfg: EditConfig,
                  cov: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Least-energy update of `a` in `layers` (keys u, values in span(gate·b)), earlier edits' keys kept."""
    layers = edit_layers(model, layers)  # ascending: a later layer's keys are read after the lower layers' update
    names = splice_names(layers, ("a",))
    before = {k: v for k, v in model.splice_state().items() if k in names}
    cores = model.splice_cores()
    # gate 0 or b = 0: span(gate·b) is empty, nothing can be written there (the search's share would be lost)
    layers = [L for L in layers if float(cores[L].gate) != 0 and bool(cores[L].b.detach().any())]
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


def _span_basis(gb: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of span(gate·b), (d, rank): QR's Q at full column rank, else the left singular
    vectors of the singular values gelsd keeps. QR's Q of dependent columns holds directions gate·b cannot
    write: the search used them, and the codes' least-squares fit silently dropped that part of its change."""
    sv = torch.linalg.svdvals(gb)
    kept = sv > torch.finfo(gb.dtype).eps * max(gb.shape) * sv.max()  # torch.linalg.lstsq's default rcond
    if bool(kept.all()):
        return torch.linalg.qr(gb).Q
    return torch.linalg.svd(gb, full_matrices=False).U[:, kept]


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
        bases = {L: _span_basis(gb[L]) for L in layers}
        z = first if r == 0 and first is not None else _wanted_changes(model, ex, layers, cfg, basis=bases)
        if r == 0:
            first = z
        neutral = _protected_neutral(model, ctx, cfg)
        for L in layers:
            # g B D = Q z, exactly: Q z lies in span(g B), and gelsd's min-norm solution drops the same small
            # singular values as _span_basis. gelsd (SVD): the default gelsy differs in the last bit from call
            # to call on CPU, so one request could give two different patches
            codes = torch.linalg.lstsq(gb[L], bases[L] @ z[L], driver="gelsd").solution
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
