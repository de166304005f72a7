"""The closed-form edit: MEMIT/AlphaEdit-style least squares on the SpliceCore output projection `b`.

Keys are k = a u (u = the down-projection input) at the target-predicting positions, r-dimensional. The
wanted change R of each chosen layer's MLP output is found as ROME/MEMIT find v*: a few Adam steps on a
free vector added to that output. Then Δb solves g Δb K ≈ R while protecting preserved keys (corpus
text, covariance C0) and earlier edits' keys K_p:

- ridge (MEMIT):      Δb = R K1ᵀ (λ C0 + w K_p K_pᵀ + K1 K1ᵀ)⁻¹ / g
- nullspace (AlphaEdit): P projects on C0's eigenvectors with eigenvalue < tol·max;
                      Δb = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + μI)⁻¹ P / g, so Δb C0-directions are untouched.
"""

from __future__ import annotations

import torch

from felix.model import FelixLM
from felix.splice_edit import (
    EditConfig,
    EditContext,
    Example,
    _batch,
    _device,
    completion_nll,
    grads_only_for,
    greedy_hits,
    splice_names,
)


def _keys(model: FelixLM, layers: list[int], examples: list[Example]) -> dict[int, torch.Tensor]:
    """k = a u at every completion-predicting position, per layer: (r, n_positions)."""
    if not examples:
        return {L: torch.zeros(model.splice_cores()[L].rank, 0) for L in layers}
    us: dict[int, torch.Tensor] = {}
    hooks = [model.layers[L].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, L=L: us.__setitem__(L, args[0].detach())) for L in layers]
    try:
        idx, labels, _ = _batch(examples, _device(model))
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    pos = labels != -100
    cores = model.splice_cores()
    return {L: (us[L][pos].float() @ cores[L].a.detach().float().t()).t() for L in layers}


def preserved_covariance(model: FelixLM, layers: list[int], preserve: torch.Tensor) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the SpliceCore keys over preservation text, per layer (r x r)."""
    us: dict[int, torch.Tensor] = {}
    hooks = [model.layers[L].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, L=L: us.__setitem__(L, args[0].detach())) for L in layers]
    try:
        with torch.no_grad():
            model(preserve.to(_device(model)))
    finally:
        for h in hooks:
            h.remove()
    cores = model.splice_cores()
    out = {}
    for L in layers:
        k = us[L].flatten(0, 1).float() @ cores[L].a.detach().float().t()
        out[L] = k.t() @ k / k.shape[0]
    return out


def _wanted_residuals(model: FelixLM, ex: Example, layers: list[int], cfg: EditConfig) -> dict[int, torch.Tensor]:
    """The change of each layer's MLP output (d_model, n_positions) that makes the target likely."""
    n = len(ex.target)
    d = model.cfg.d_model
    deltas = {L: torch.zeros(n, d, requires_grad=True) for L in layers}
    start = ex.n_prompt - 1
    hooks = []
    for L in layers:
        def add(_m, _args, out, L=L):
            out = out.clone()
            out[0, start : start + n] = out[0, start : start + n] + deltas[L].to(out.dtype)
            return out
        hooks.append(model.layers[L].mlp.register_forward_hook(add))
    opt = torch.optim.Adam(list(deltas.values()), lr=cfg.delta_lr)
    try:
        with grads_only_for(model, []):
            for _ in range(cfg.delta_steps):
                loss = completion_nll(model, [ex]) + 1e-3 * sum((v ** 2).sum() for v in deltas.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for h in hooks:
            h.remove()
    return {L: v.detach().t() for L, v in deltas.items()}


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
            wanted = _wanted_residuals(model, ex, layers, cfg)
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
                    cores[L].b.add_(db.to(cores[L].b.dtype))
        after = {n: v.clone() for n, v in model.splice_state().items() if n in names}
    finally:
        model.load_splice_state(before, strict=False)
    return after
