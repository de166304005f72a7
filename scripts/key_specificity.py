#!/usr/bin/env python
"""EXP-46r: at which site of the network is an edit's key specific to its prompt?

A linear edit keyed on a site's activation s (today's SpliceCore: u, the down-projection input at the last
prompt position) moves every other input by a share of what it writes at its own key. For the least-C-energy
rank-one write (ROME's C⁻¹k, what `closed_form_a` does per key) that share is

    ρ(e, s) = k_eᵀ C⁻¹ s / k_eᵀ C⁻¹ k_e,    C = E[s sᵀ] over the preservation text + 1e-2·tr(C)/d

so ρ = 1 at the edit's own key. A good site gives ρ near 1 on the edit's paraphrases and near 0 on other
prompts. For every layer and three sites, `u` (down-projection input, d_ff), `x` (the MLP input after its
norm, d_model) and `o` (the attention heads' output, the input of o_proj, d_model), the script reports:

- `auc`: the chance that a paraphrase's |ρ| exceeds a neutral prompt's |ρ| for the same edit (pooled);
- `paraphrase_rho`: the median ρ over (edit, paraphrase);
- `leak_share`: the share of neutral prompts that some edit moves by |ρ| ≥ 0.3; `pair_leak_share`: the
  share of (edit, neutral prompt) pairs with |ρ| ≥ 0.3;
- `same_last_token_rho` / `other_rho`: mean |ρ| over (edit, neutral) pairs whose prompts end in the same
  token / do not;
- `heldout_rms`: median over edits of the RMS of ρ over the mix's held-out tokens (w_eᵀ C_h w_e)^½.

With `--stack` and `--locality` (a kept EXP-46 stack and `scripts/locality_attribution.py`'s output on it),
the proxy is checked against what broke: each neutral prompt's max |ρ_u| over the applied edits, at the layers
each edit wrote, as a predictor (AUC) of its next token having changed by the end.

    python scripts/key_specificity.py runs/demo-wide/run runs/wide-spec-s0.jsonl out.json \
        --stack runs/exp46g-rep/stack --locality runs/exp46g-locality.json
The write-up is docs/experiments/EXP-46r-key-specificity.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from felix.atomic import atomic_write_text
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.splice_bench import neutral_pool
from felix.splice_data import examples_of, splice_texts
from felix.splice_edit import load_requests

SITES = ("u", "x", "o")
RIDGE = 1e-2  # closed_form_a's a_ridge
LEAK = 0.3


def site_activations(model, idx: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Every site's activation for token ids idx (B, T): {(site, layer): (B, T, d)}."""
    acts: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for L, block in enumerate(model.layers):
        for site, mod in (("u", block.mlp.down_proj), ("x", block.mlp), ("o", block.attn.o_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, args, key=(site, L): acts.__setitem__(key, args[0].detach().float())))
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return acts


def second_moments(model, windows: torch.Tensor, chunk: int = 32) -> dict[tuple[str, int], torch.Tensor]:
    sums: dict[tuple[str, int], torch.Tensor] = {}
    for part in windows.split(chunk):
        for key, a in site_activations(model, part).items():
            x = a.flatten(0, 1).double()
            sums[key] = sums[key] + x.t() @ x if key in sums else x.t() @ x
    return {k: v / windows.numel() for k, v in sums.items()}


def last_position(model, prompts: list[list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Each prompt's activation at its last position: {(site, layer): (n, d)}."""
    rows: dict[tuple[str, int], list[torch.Tensor]] = {}
    for ids in prompts:
        for key, a in site_activations(model, torch.tensor([ids])).items():
            rows.setdefault(key, []).append(a[0, -1].double())
    return {k: torch.stack(v) for k, v in rows.items()}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + ½ P(pos = neg), by ranks."""
    both = np.concatenate([pos, neg])
    ranks = both.argsort(kind="stable").argsort(kind="stable").astype(float) + 1
    for v in np.unique(both):  # average ranks over ties
        m = both == v
        ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--stack", help="a kept bench stack (--keep-patches) to validate the proxy on")
    ap.add_argument("--locality", help="scripts/locality_attribution.py's output on that stack")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    model, tok, ckpt = load_model(args.checkpoint)
    heldout, preserve = splice_texts(ckpt, model)
    requests = load_requests(args.edits)[: args.n]
    pool, _ = neutral_pool(model, tok, requests)
    max_len = model.cfg.max_seq_len
    edit_ids, para_ids, para_of = [], [], []
    for i, r in enumerate(requests):
        ex, paras = examples_of(tok, r, max_len)
        edit_ids.append(list(ex.ids[: ex.n_prompt]))
        for p in paras:
            para_ids.append(list(p.ids[: p.n_prompt]))
            para_of.append(i)
    para_of = np.array(para_of)
    same_last = np.array([[e[-1] == n[-1] for n in pool] for e in edit_ids])

    cov = second_moments(model, preserve)
    held = {s: second_moments(model, w) for s, w in heldout.windows.items()}
    cov_h = {k: sum(heldout.weights[s] * held[s][k] for s in held) for k in cov}
    k_edit, k_para, k_pool = last_position(model, edit_ids), last_position(model, para_ids), last_position(model, pool)

    sites: dict[str, dict] = {}
    rho_u: dict[int, np.ndarray] = {}
    for (site, L), c in sorted(cov.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        d = c.shape[0]
        c = c + RIDGE * float(c.trace()) / d * torch.eye(d, dtype=c.dtype)
        cinv_k = torch.linalg.solve(c, k_edit[site, L].t())  # (d, n_edits)
        w = cinv_k / (k_edit[site, L] * cinv_k.t()).sum(1)  # columns: C⁻¹k_e / k_eᵀC⁻¹k_e
        rho_n = (k_pool[site, L] @ w).t().numpy()  # (n_edits, n_pool)
        rho_p = (k_para[site, L] @ w).numpy()[np.arange(len(para_of)), para_of]  # each paraphrase, own edit
        pos = np.abs(rho_p)
        neg = np.abs(rho_n[para_of])  # every neutral prompt against each paraphrase's edit
        aucs = [auc(pos[j : j + 1], neg[j]) for j in range(len(pos))]
        rms = torch.sqrt(torch.einsum("de,df,fe->e", w, cov_h[site, L], w)).numpy()
        sites[f"{site}{L}"] = {
            "site": site, "layer": L, "dim": d, "auc": float(np.mean(aucs)),
            "paraphrase_rho": float(np.median(rho_p)),
            "leak_share": float((np.abs(rho_n).max(0) >= LEAK).mean()),
            "pair_leak_share": float((np.abs(rho_n) >= LEAK).mean()),
            "same_last_token_rho": float(np.abs(rho_n[same_last]).mean()) if same_last.any() else None,
            "other_rho": float(np.abs(rho_n[~same_last]).mean()),
            "heldout_rms": float(np.median(rms))}
        if site == "u":
            rho_u[L] = rho_n
        print(json.dumps(sites[f"{site}{L}"]), flush=True)

    out = {"checkpoint": args.checkpoint, "edits": args.edits, "n_edits": len(requests),
           "n_paraphrases": len(para_ids), "n_neutral": len(pool),
           "same_last_token_pairs": int(same_last.sum()), "sites": sites}
    if args.stack and args.locality:
        out["validation"] = validate(requests, edit_ids, pool, rho_u, args.stack, args.locality)
        print(json.dumps(out["validation"]), flush=True)
    atomic_write_text(args.out, json.dumps(out, indent=1))


def validate(requests, edit_ids, pool, rho_u, stack_dir: str, locality: str) -> dict:
    """How well each neutral prompt's max |ρ_u| over the applied edits predicts its next token breaking."""
    index = {r.id: i for i, r in enumerate(requests)}
    wrote: dict[int, list[int]] = {}
    for p in PatchStack.open(stack_dir).list():
        rid = p.record["request"].get("id")
        if rid in index:
            wrote[index[rid]] = sorted({int(name.split(".")[1]) for name in p.after})
    score = np.zeros(len(pool))
    for i, layers in wrote.items():
        for L in layers:
            score = np.maximum(score, np.abs(rho_u[L][i]))
    rows = json.loads(Path(locality).read_text())["neutral"]
    if len(rows) != len(pool):
        raise SystemExit(f"{locality}: {len(rows)} neutral prompts, the pool has {len(pool)}")
    broken = np.array([not r["kept_next_token"] for r in rows])
    same = np.array([any(edit_ids[i][-1] == n[-1] for i in wrote) for n in pool])
    return {"applied": len(wrote), "broken": int(broken.sum()), "kept": int((~broken).sum()),
            "auc_max_rho_u": auc(score[broken], score[~broken]),
            "auc_same_last_token": auc(same[broken].astype(float), same[~broken].astype(float)),
            "median_score_broken": float(np.median(score[broken])),
            "median_score_kept": float(np.median(score[~broken]))}


if __name__ == "__main__":
    main()
