"""A checkpoint opened for inference: the model, its tokenizer and, on request, its patch stack applied.

Every verb that reads a trained model (generate, splice, serve, export, eval, quantize) goes through
`load_model`, so a training checkpoint and a `felix quantize` artifact load alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from felix.checkpoint import TOKENIZER_FILE, Checkpoint, load_checkpoint, load_model_weights
from felix.device import check_device
from felix.errors import FelixError
from felix.model import FelixLM
from felix.patches import PatchStack
from felix.quant_artifact import is_quant_artifact, load_quant_checkpoint
from felix.splice_fold import restore_served
from felix.tokenizer import FelixTokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu",
               splices: bool = False) -> tuple[FelixLM, FelixTokenizer, Checkpoint]:
    """A checkpoint ready for inference: (FelixLM in eval mode, FelixTokenizer, Checkpoint).

    `splices`: apply the checkpoint's patch stack (`CHECKPOINT/splices/`), so the model is the one the
    splice tools edited and a server would serve (on a quantized artifact, unrounded edits folded onto its
    grid: `splice_fold.restore_served`); False gives the weights as trained.
    """
    check_device(device)
    # a `felix quantize` artifact loads dequantized: the model computes what the packed weights hold
    ckpt = (load_quant_checkpoint(path, device) if is_quant_artifact(path)
            else load_checkpoint(path, map_location=device))
    tok_path = ckpt.path / TOKENIZER_FILE
    if not tok_path.is_file():
        if not ckpt.config.data.tokenizer:
            raise FelixError(f"{ckpt.path}: no {TOKENIZER_FILE} in the checkpoint and none named in its config")
        tok_path = Path(ckpt.config.data.tokenizer)
    tokenizer = FelixTokenizer.load(tok_path)
    if tokenizer.vocab_size > ckpt.config.model.vocab_size:  # its top ids would index past the embedding
        raise FelixError(f"{tok_path}: tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"model.vocab_size {ckpt.config.model.vocab_size}; is it the tokenizer the model was "
                         f"trained with?")
    model = FelixLM(ckpt.config.model).to(device)
    load_model_weights(model, ckpt)
    if splices:
        restore_served(model, tokenizer, ckpt, PatchStack.open(ckpt.path))
    model.eval()
    return model, tokenizer, ckpt
