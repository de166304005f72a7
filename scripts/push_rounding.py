#!/usr/bin/env python
"""EXP-46s: do a kept 100-edit stack's SpliceCore tensors survive being pushed into a quantized server?

The model is served as `felix quantize` packs it: every weight rounded to RQ4 (`fake_quantize_model`, what a
quantized artifact loads as). Each arm starts from that unspliced model in a `SpliceService`. It pushes the
stack's final fp32 SpliceCore tensors through `push_tensor`, bottom layer first, `a` before `b`, as a client
would. The arms differ only in how the server rounds a push: plainly, or with GPTQ on the preservation text
(`PushRounding`, which is `push_gptq_no_refit`; the refit and the pushed change's own input directions, which
the experiment dropped, are `VariantPushRounding` below).
Two references: the spliced fp32 model, and `felix quantize`'s GPTQ rounding of the whole spliced state,
which knows the stack's edit keys. Each arm is measured with the bench's rates (every request's target,
paraphrases, the neutral pool's 4-token continuations of the unspliced fp32 model) and the mix's held-out
drift against the unspliced fp32 model.

    python scripts/push_rounding.py runs/demo-wide/run runs/wide-spec-s0.jsonl runs/exp46g-rep/stack out.json
The write-up is docs/experiments/EXP-46s-push-rounding.md.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
import time

import torch
from kept_stack import KeptStack, kept_stack_args

from felix.atomic import atomic_write_text
from felix.patches import PatchStack
from felix.quant_gptq import gptq_round
from felix.quantize import fake_quantize_model
from felix.server_api import SpliceService
from felix.splice_quant import PushRounding, edit_weighted_covariance, gptq_requantizer


class VariantPushRounding(PushRounding):
    """`PushRounding` with the two options EXP-46s measured and dropped.

    `refit`: when the last push to a layer was its `a`, `b` is first refit from that pushed fp32 `a` to the
    rounded one under the same H, as `gptq_requantizer` does. `delta_keys`: half of `a`'s H moves onto C Δaᵀ,
    the input directions where the pushed change acts.
    """

    def __init__(self, preserve, fmt: str, refit: bool, delta_keys: bool):
        super().__init__(preserve, fmt)
        self.refit, self.delta_keys = refit, delta_keys
        self._pushed_a: dict[int, tuple] = {}  # layer -> (pushed fp32 `a`, its H)

    def __call__(self, model, name, tensor, edits=()):
        layer, kind = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        if kind == "gate":
            return super().__call__(model, name, tensor, edits)
        pushed_a, h = self._pushed_a.pop(layer, (None, None))
        if kind == "a" or h is None:
            h = self.input_moment(model, layer, edits)
        if kind == "a":
            if self.delta_keys:
                cov = self.covariances.get(model, [layer])[layer].double()
                delta = tensor.double() - model.splice_cores()[layer].a.detach().double().cpu()
                h = edit_weighted_covariance(h, cov @ delta.t(), self.edit_share)
            self._pushed_a[layer] = (tensor.detach().double().cpu(), h)
            return gptq_round(tensor.double(), h, self.format, self.damp)
        a_q, b = model.splice_cores()[layer].a.detach().double().cpu(), tensor.double()
        if self.refit and pushed_a is not None:
            cross, own = pushed_a @ h @ a_q.t(), a_q @ h @ a_q.t()
            ridge = 1e-9 * float(own.trace()) * torch.eye(own.shape[0], dtype=torch.float64)
            b = torch.linalg.solve(own + ridge, (b @ cross).t()).t()
        return gptq_round(b, a_q @ h @ a_q.t(), self.format, self.damp)


def main() -> None:
    args = kept_stack_args(__doc__)

    kept = KeptStack(args)
    model, tok, preserve, spliced = kept.model, kept.tok, kept.preserve, kept.spliced
    order = sorted((k for k in spliced if not k.endswith(".gate")), key=lambda k: (int(k.split(".")[1]), k))
    results: dict[str, dict] = {"_": {"applied": len(kept.applied), "pushes": order}}

    def measure(name: str, m, seconds: float) -> None:
        results[name] = kept.measure(m) | {"round_seconds": seconds}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)

    measure("fp32", model, 0.0)
    model.load_splice_state(kept.state0)
    served0 = fake_quantize_model(model, "rq4")
    measure("rq4_unspliced", served0, 0.0)

    pushes = {"push_plain": None,
              "push_gptq": dict(refit=True, delta_keys=False),
              "push_gptq_no_refit": dict(refit=False, delta_keys=False),
              "push_gptq_delta_keys": dict(refit=True, delta_keys=True)}
    for name, options in pushes.items():
        served = fake_quantize_model(model, "rq4")
        with tempfile.TemporaryDirectory() as tmp:
            rounding = None if options is None else VariantPushRounding(preserve, "rq4", **options)
            service = SpliceService(served, tok, PatchStack(tmp, []), quant_format="rq4", push_rounding=rounding)
            t0 = time.perf_counter()
            for key in order:
                data = spliced[key].detach().float().contiguous().numpy().astype("<f4").tobytes()
                service.push_tensor({"name": key, "data": base64.b64encode(data).decode()})
            measure(name, served, time.perf_counter() - t0)

    served = fake_quantize_model(model, "rq4")
    served.load_splice_state(spliced)
    t0 = time.perf_counter()
    gptq_requantizer(preserve, kept.applied, "rq4", edit_share=0.5)(served)
    measure("quantize_gptq", served, time.perf_counter() - t0)
    atomic_write_text(args.out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
