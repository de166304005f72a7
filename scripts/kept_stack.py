"""The command line shared by the scripts that measure a patch stack kept by `felix splice bench`."""

from __future__ import annotations

import argparse


def kept_stack_args(doc: str | None) -> argparse.Namespace:
    """CHECKPOINT EDITS STACK OUT [--n N], parsed, with gradients off for the measurement that follows."""
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("stack", help="the directory given to --keep-patches")
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--n", type=int, default=100)
    torch.set_grad_enabled(False)
    return ap.parse_args()


class KeptStack:
    """A kept stack's run, read for measuring rounding arms: the unspliced model (`state0`) and the stack's
    final SpliceCore state (`spliced`), the held-out and preservation text, every request's examples, the
    neutral pool's continuations, the applied edits, and `measure`: the bench's rates plus the held-out
    drift against the unspliced model."""

    def __init__(self, args):
        import math

        from felix.heldout import heldout_nll
        from felix.model_loader import load_model
        from felix.patches import PatchStack
        from felix.splice_bench import _rates, neutral_pool
        from felix.splice_data import examples_of, splice_texts
        from felix.splice_edit import load_requests

        self.model, self.tok, self.ckpt = model, tok, ckpt = load_model(args.checkpoint)
        self.heldout, self.preserve = splice_texts(ckpt, model)
        requests = load_requests(args.edits)[: args.n]
        _, self.neutral = neutral_pool(model, tok, requests)
        nll0 = heldout_nll(model, self.heldout)
        self.examples = [examples_of(tok, r, model.cfg.max_seq_len) for r in requests]
        self.state0 = model.splice_state()
        PatchStack.open(args.stack).restore(model)
        records = [p.record["request"] for p in PatchStack.open(args.stack).list()]
        self.applied = [e for (e, _), r in zip(self.examples, requests, strict=True) if r.to_dict() in records]
        self.spliced = model.splice_state()

        def measure(m) -> dict:
            return _rates(m, self.examples, self.neutral) | {
                "ppl_drift": math.exp(heldout_nll(m, self.heldout) - nll0) - 1}

        self.measure = measure
