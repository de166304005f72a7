"""The weights `felix quantize` packs from a checkpoint with a patch stack: the stack applied, and its
SpliceCore tensors GPTQ-rounded onto the format's grid so that packing keeps the edits."""

from __future__ import annotations

import time

import torch

from felix.errors import FelixError
from felix.model_loader import load_model
from felix.quant_formats import get_format
from felix.quantize import fake_quantize_model
from felix.splice_data import PRESERVE_WINDOWS, preservation_windows, stack_edits
from felix.splice_quant import GPTQ_FORMATS, gptq_requantizer

SPLICE_ROUNDINGS = ("auto", "gptq", "plain")


def splice_rounding(rounding: str, fmt: str) -> str:
    """`--splice-rounding` as `fmt` takes it: "auto" is "gptq" for the codebook formats (rq4, rq3, nf4), whose
    grid GPTQ rounds onto, else "plain"; an explicit "gptq" with any other format is refused, not done plainly."""
    if rounding not in SPLICE_ROUNDINGS:
        raise FelixError(f"--splice-rounding must be one of {', '.join(SPLICE_ROUNDINGS)}, got {rounding!r}")
    if rounding == "auto":
        return "gptq" if fmt in GPTQ_FORMATS else "plain"
    if rounding == "gptq" and fmt not in GPTQ_FORMATS:
        raise FelixError(f"--splice-rounding gptq needs a codebook format ({', '.join(GPTQ_FORMATS)}), not {fmt}: "
                         f"{fmt} rounds SpliceCore tensors plainly (--splice-rounding auto or plain)")
    return rounding


def spliced_state(stack, fmt: str, rounding: str = "auto", embeddings: str = "quantize", edit_share: float = 0.5,
                  preserve_windows: int = PRESERVE_WINDOWS) -> tuple[dict[str, torch.Tensor], object, dict]:
    """The weights of `stack`'s checkpoint with the stack applied, ready to pack in `fmt`; its FelixConfig;
    and what was done.

    With `rounding` "gptq" (or "auto", see `splice_rounding`) and a codebook format (rq4, rq3, nf4) the
    SpliceCore tensors are GPTQ-rounded onto the grid, weighted by the preservation windows of the
    checkpoint's data mix and the stack's fact edits, so packing keeps them exactly; "plain" (or "auto"
    with q8_0/q4_0) leaves them for packing to round plainly. GPTQ reads each
    SpliceCore's inputs through the model as deployed (every other weight rounded as packing will round
    it, `embeddings` included); the other weights are returned unrounded, for packing to round.
    """
    get_format(fmt)
    rounding = splice_rounding(rounding, fmt)
    model, tok, ckpt = load_model(stack.checkpoint_dir)
    stack.restore(model)
    edits = stack_edits(stack, tok, model.cfg.max_seq_len)
    info = {"patches": len(stack), "fact_edits": len(edits), "rounding": "plain"}
    if rounding == "gptq" and model.cfg.splice_layers:
        t0 = time.perf_counter()
        try:
            preserve = preservation_windows(ckpt, model, preserve_windows)
        except FelixError as exc:
            raise FelixError(f"GPTQ rounding of the applied splices needs the training text: {exc} "
                             "(or quantize with --splice-rounding plain)") from None
        deployed = fake_quantize_model(model, fmt, embeddings)
        deployed.load_splice_state(model.splice_state())  # SpliceCore unrounded, for GPTQ to round
        gptq_requantizer(preserve, edits, fmt, edit_share)(deployed)
        model.load_splice_state(deployed.splice_state())
        info |= {"rounding": "gptq", "edit_share": edit_share, "preserve_windows": int(preserve.shape[0]),
                 "seconds": time.perf_counter() - t0}
    return {k: v.detach() for k, v in model.state_dict().items()}, ckpt.config, info
