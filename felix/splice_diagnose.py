"""Where is a behaviour decided? Logit lens across blocks and causal concentration in SpliceCore layers.

Definitions (docs/splicing.md has the long form):

- Behaviour metric m = log p(target) - log p(predicted) at the first completion position, where
  `predicted` is the model's current greedy token there (when the two coincide, m = log p(target)).
  A counterfactual edit has to move m above 0.
- Logit lens: the residual stream after each block, through the final RMSNorm and the tied lm_head:
  the target token's rank and probability, and the top token, per block.
- Components: the d_ff channels u_j of the down-projection input (the MLP "keys") of every SpliceCore
  layer, at the last prompt position. Their causal effect is estimated by attribution patching,
  effect_j = |u_j * dm/du_j| (first-order estimate of what zero-ablating u_j does to m). u feeds both
  W_down and the SpliceCore, so the gradient takes both paths (the SpliceCore is trained from step 0).
- CCI@k of a layer = (sum of its k largest effects) / (sum of all its effects); CCI@k pooled = the same
  over the components of all SpliceCore layers together. The brief allows an edit when CCI@5 > 0.5
  (cheap edit types) or > 0.3 (fine-tuning types).
- Layer effect: the exact change of m when that layer's whole MLP output at the last prompt position
  is zeroed. Layers are chosen for editing by their share of the attribution mass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from felix.errors import FelixError
from felix.model import FelixLM
from felix.splice_examples import Example, grads_only_for


def _prompt_ids(model: FelixLM, ex: Example) -> torch.Tensor:
    """The example's prompt as a (1, T) batch; it needs a prompt token and a first target token to read."""
    if ex.n_prompt < 1 or len(ex.ids) <= ex.n_prompt:
        raise FelixError(f"diagnosis needs at least one prompt token and one target token; the example has "
                         f"{ex.n_prompt} prompt and {len(ex.ids) - ex.n_prompt} target tokens")
    return torch.tensor([ex.ids[: ex.n_prompt]], device=model.tok_emb.weight.device)


@contextlib.contextmanager
def _eval_mode(model: FelixLM) -> Iterator[None]:
    """Eval mode inside (train mode with activation checkpointing recomputes blocks in backward, which
    re-runs the hooks and orphans their leaves); every module's own mode comes back after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _metric_tokens(model: FelixLM, ex: Example) -> tuple[int, int]:
    idx = _prompt_ids(model, ex)
    with torch.no_grad(), _eval_mode(model):
        logits = model(idx)[0, -1]
    return ex.ids[ex.n_prompt], int(logits.argmax())


def _metric(logits: torch.Tensor, target: int, predicted: int) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), -1)
    return lp[..., target] - (lp[..., predicted] if predicted != target else 0.0)


@torch.no_grad()
def logit_lens(model: FelixLM, tok, ex: Example) -> list[dict[str, Any]]:
    """Per block: the target token's rank/probability and the top token, read through norm + lm_head."""
    _, hidden = model(_prompt_ids(model, ex), return_hidden=True)
    target = ex.ids[ex.n_prompt]
    rows = []
    for layer, h in enumerate(hidden):
        probs = torch.softmax(model.lm_head(model.norm(h[0, -1])).float(), -1)
        top = int(probs.argmax())
        rows.append({"layer": layer, "target_rank": int((probs > probs[target]).sum()) + 1,
                     "target_prob": float(probs[target]), "top_token": tok.decode([top]) if tok else str(top),
                     "top_id": top, "top_prob": float(probs[top]), "splice": layer in model.cfg.splice_layers})
    return rows


def attributions(model: FelixLM, examples: list[Example], targets: list[tuple[int, int]] | None = None,
                 layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Attribution-patching effects |u_j * dm/du_j| per SpliceCore layer, summed over `examples`.

    `targets` gives (target, predicted) per example; by default they are read off the model.
    """
    layers = layers if layers is not None else model.cfg.splice_layers
    if bad := [L for L in layers if not 0 <= L < model.cfg.n_layers]:
        raise FelixError(f"layers {bad}: the model has layers 0..{model.cfg.n_layers - 1}")
    total = {L: torch.zeros(model.cfg.d_ff) for L in layers}
    if not layers:
        return total
    targets = targets or [_metric_tokens(model, e) for e in examples]
    for ex, (target, predicted) in zip(examples, targets, strict=True):
        idx = _prompt_ids(model, ex)
        us: dict[int, torch.Tensor] = {}

        def leaf(_m, args, L, us=us):
            # the lowest u read becomes a leaf that requires grad, so backward reaches it with every weight
            # frozen; a higher u stays in the graph, so a lower one's gradient also takes the MLPs above it
            u = args[0]
            if u.requires_grad:
                u.retain_grad()
            else:
                u = u.detach().requires_grad_(True)
            us[L] = u
            return (u,)

        def same_leaf(_m, _args, L, us=us):
            return (us[L],)  # the SpliceCore reads u after W_down does: its path must reach the leaf too

        hooks = []
        for L in layers:
            mlp = model.layers[L].mlp
            hooks.append(mlp.down_proj.register_forward_pre_hook(lambda m, a, L=L: leaf(m, a, L)))
            if mlp.splice is not None:
                hooks.append(mlp.splice.register_forward_pre_hook(lambda m, a, L=L: same_leaf(m, a, L)))
        try:
            with grads_only_for(model, []), torch.enable_grad(), _eval_mode(model):
                _metric(model(idx)[0, -1], target, predicted).backward()
        finally:
            for h in hooks:
                h.remove()
        for L in layers:
            total[L] += (us[L][0, -1] * us[L].grad[0, -1]).abs().detach().float().cpu()
    return total


def cci(effects: torch.Tensor, k: int) -> float:
    """Causal concentration index: top-k share of the total effect."""
    s = float(effects.sum())
    return float(effects.topk(min(k, effects.numel())).values.sum()) / s if s > 0 else 0.0


@torch.no_grad()
def layer_effects(model: FelixLM, ex: Example, target: int, predicted: int) -> dict[int, float]:
    """Exact change of m when a SpliceCore layer's MLP output at the last prompt position is zeroed."""
    idx = _prompt_ids(model, ex)
    m0 = float(_metric(model(idx)[0, -1], target, predicted))
    out = {}
    for L in model.cfg.splice_layers:
        def zero_last(_m, _a, o):
            o = o.clone()
            o[:, -1] = 0
            return o
        h = model.layers[L].mlp.register_forward_hook(zero_last)
        try:
            out[L] = float(_metric(model(idx)[0, -1], target, predicted)) - m0
        finally:
            h.remove()
    return out


GATE_K = 5  # brief §5: an edit is allowed when CCI@5 > 0.5 (cheap types) or > 0.3 (fine-tuning types)


def diagnose(model: FelixLM, tok, ex: Example, k: int = 5, share: float = 0.25) -> dict[str, Any]:
    """Logit lens, per-layer CCI@k and layer effects, and the SpliceCore layers to edit.

    Chosen layers: every SpliceCore layer holding at least `share` of the attribution mass (the top
    one always), highest first.
    """
    if not model.cfg.splice_layers:
        raise FelixError("the model has no SpliceCore layers: there is nothing to diagnose or edit")
    if k < 1:
        raise FelixError(f"k must be at least 1 (CCI@k over the k strongest components), got {k}")
    target, predicted = _metric_tokens(model, ex)
    eff = attributions(model, [ex], [(target, predicted)])
    mass = {L: float(v.sum()) for L, v in eff.items()}
    total = sum(mass.values()) or 1.0
    pooled = torch.cat([eff[L] for L in sorted(eff)]) if eff else torch.zeros(1)
    ranked = sorted(mass, key=mass.get, reverse=True)
    chosen = [L for L in ranked if mass[L] / total >= share] or ranked[:1]
    cci_pooled = cci(pooled, k)
    cci_gate = cci(pooled, GATE_K)  # the brief's gates are on CCI@5, whatever k the caller reports
    return {
        "target_token": tok.decode([target]) if tok else target,
        "predicted_token": tok.decode([predicted]) if tok else predicted,
        # ids too: tokens that are parts of one UTF-8 character all decode to "\ufffd"
        "target_id": target, "predicted_id": predicted,
        "logit_lens": logit_lens(model, tok, ex),
        "layers": {str(L): {"cci": cci(eff[L], k), "attribution_share": mass[L] / total, "ablation_effect": v,
                            "top_components": eff[L].topk(min(k, eff[L].numel())).indices.tolist()}
                   for L, v in layer_effects(model, ex, target, predicted).items()},
        f"cci@{GATE_K}": cci_gate,
        f"cci@{k}": cci_pooled,
        "allowed_cheap": cci_gate > 0.5,
        "allowed_finetune": cci_gate > 0.3,
        "chosen_layers": chosen,
    }
