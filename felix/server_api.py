"""The splice server's request logic, free of HTTP: `SpliceService`, its loading and its reads (completions,
status, the OpenAI model list and chat requests); its splice writes and the snapshots they publish are
`felix.server_writes`, generation `felix.server_generate`, the OpenAI chat fields `felix.server_chat`.

`SpliceService` owns one loaded model, its tokenizer and its `PatchStack`. Every endpoint method takes a
parsed JSON body and returns a JSON-ready dict, or raises `ApiError(status, code, message)`; `felix.server`
turns those into HTTP responses. Reads run on the snapshot served when they start (`felix.server_writes`:
writes never wait for them nor they for writes); a completion with `ablate_layers` runs on a twin of its
snapshot with those gates zeroed.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from felix.activation_bound import LIMIT, ActivationBound, norm64
from felix.chat import chat_ids, chat_turns
from felix.errors import FelixError
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.patch_format import SPLICES_DIR
from felix.patches import PatchStack, lock_stack
from felix.quant_formats import get_format
from felix.run_lock import RunLock
from felix.server_chat import chat_params, check_model
from felix.server_common import (
    Delta,
    GenParams,
    GenResult,
    bad_request,
    int_field,
    json_mode,
    number_field,
    parses_as_json,
)
from felix.server_generate import stream_completion
from felix.server_writes import Served, SpliceWrites
from felix.splice_data import preservation_windows, stack_edits
from felix.splice_fold import StackFold
from felix.splice_quant import FP32_FORMATS, GPTQ_FORMATS, PushRounding, on_grid, requantizer
from felix.tokenizer import FelixTokenizer

# A turn ends at <|end|>; a model that starts another turn or emits end-of-text is done too.
PUSH_ROUNDINGS = ("auto", "fold", "gptq", "plain")


class SpliceService(SpliceWrites):
    """One served model: completions, splice writes through the patch stack, status, rollback; `close` (or
    a `with` block) lets go of the stack."""

    def __init__(self, model: FelixLM, tokenizer: FelixTokenizer, stack: PatchStack, model_id: str = "felix",
                 quant_format: str | None = None, push_rounding: PushRounding | None = None,
                 push_rounding_note: str | None = None, fold: StackFold | None = None):
        self.tok, self.stack = tokenizer, stack
        self.model_id = model_id
        self.quant_format = None if quant_format in FP32_FORMATS else quant_format
        if self.quant_format:
            get_format(self.quant_format)  # an unknown format fails at startup, not on the first push
        if push_rounding is not None and push_rounding.fmt != self.quant_format:
            raise FelixError(f"push rounding is for {push_rounding.fmt}, the model is served as "
                             f"{self.quant_format or 'f32'}")
        if fold is not None and (fold.fmt != self.quant_format or push_rounding is not None):
            raise FelixError(f"a folded stack is served in its fold's format ({fold.fmt}) with no push rounding")
        self.push_rounding = push_rounding
        self.push_rounding_note = push_rounding_note  # why a quantized server rounds pushes plainly, if it does
        self.stack_lock: RunLock | None = None  # `load` holds the stack's write lock here until `close`
        self.closed = False
        # Writes are made on the twin, which holds the stack's state (unrounded under a fold); the model
        # serves that state, or its fold.
        self.twin = model.splice_twin()
        self.bound = ActivationBound(self.twin)
        self.writing = threading.Lock()
        self.fold = fold
        if fold:
            fold.serve(model, stack_edits(stack, tokenizer, model.cfg.max_seq_len))
        self.served = Served(model, self._patch_rows())  # replaced whole by each write, never changed in place
        self.shapes = {k: tuple(v.shape) for k, v in model.splice_state().items()}
        self.splice_layers = sorted(model.splice_cores())
        self.stop_ids = set(tokenizer.stop_ids)
        self.created = int(time.time())
        # What every write is tried on first: values that overflow the forward pass do so on any input.
        self.probe_ids = torch.tensor([tokenizer.encode("def main():\n    return 0\n")],
                                      device=model.tok_emb.weight.device)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu", model_id: str = "felix",
             quant_format: str | None = None, push_rounding: str = "auto") -> SpliceService:
        """Load a checkpoint and re-apply its saved patch stack (spliced state survives restarts).

        `quant_format` None means: the artifact's format when `checkpoint` is a `felix quantize` artifact
        (it loads dequantized, so pushes must be re-quantized to match; any other format is refused), else
        fp32. `push_rounding`:
        - "fold": the stack keeps every write unrounded and the model serves the whole stack GPTQ-rounded
          once (`StackFold`, as `felix splice apply` leaves an artifact's edits; EXP-46z);
        - "gptq": each pushed tensor is GPTQ-rounded on the checkpoint's training text (`PushRounding`);
        - "plain": each weight to its nearest grid value;
        - "auto" (the default): "fold" when the saved stack holds unrounded edits (a patch whose tensors are
          off the format's grid), else "gptq" where the training text is readable (EXP-46v: GPTQ kept 4–14
          more edits in 100 on all six stacks measured, and drifted less), else "plain", saying why in
          `push_rounding_note`.
        Rounding needs a codebook format; "gptq" and "fold" need the data mix's text. Unless folded, a
        checkpoint served in a format it is not stored in (an fp32 checkpoint with `quant_format` "rq4")
        serves its trained SpliceCore as `felix quantize` of it stores it (`requantizer`, plain rounding:
        what a checkpoint without patches is packed with), with the patches on top.

        The service holds the patch stack's write lock (`lock_stack`) until `close` (or its use as a context
        manager ends), so `felix splice apply`/`rollback` on the same checkpoint are refused while it serves;
        a read-only checkpoint, which nothing writes, is served without it.
        """
        if push_rounding not in PUSH_ROUNDINGS:
            raise FelixError(f"push rounding must be one of {', '.join(PUSH_ROUNDINGS)}, got {push_rounding!r}")
        model, tok, ckpt = load_model(checkpoint, device)
        if quant_format is None:
            quant_format = ckpt.quant_format
        elif ckpt.quant_format is not None and quant_format != ckpt.quant_format:
            served = "f32" if quant_format in FP32_FORMATS else quant_format
            pushes, other = (("left unrounded", "the fp32 checkpoint it was made from") if served == "f32" else
                             (f"rounded to {served}", f"an artifact made by `felix quantize --format {served}`"))
            raise FelixError(f"{ckpt.path}: a `felix quantize` artifact in {ckpt.quant_format} cannot be served as "
                             f"{served} (--format {quant_format}): its other weights stay {ckpt.quant_format}, so with "
                             f"its SpliceCore and every push {pushes} it would be neither format's model; leave "
                             f"--format out (or give {ckpt.quant_format}), or serve {other}")
        if push_rounding in ("gptq", "fold") and quant_format not in GPTQ_FORMATS:
            raise FelixError(f"{push_rounding} push rounding needs a codebook format ({', '.join(GPTQ_FORMATS)}); "
                             f"the model is served as {quant_format or 'f32'}")
        splices = ckpt.path / SPLICES_DIR
        writable = os.access(splices if splices.is_dir() else ckpt.path, os.W_OK)
        lock = lock_stack(ckpt.path, "felix serve") if writable else None  # before the stack is read
        try:
            service = cls._serving(ckpt, model, tok, model_id, quant_format, push_rounding)
        except BaseException:
            if lock is not None:
                lock.release()  # a server that did not start holds nothing
            raise
        service.stack_lock = lock
        return service

    @classmethod
    def _serving(cls, ckpt, model: FelixLM, tok: FelixTokenizer, model_id: str, quant_format: str | None,
                 push_rounding: str) -> SpliceService:
        """`load`'s work once the stack is held: read it, choose the rounding, restore, build the service."""
        stack = PatchStack.open(ckpt.path)
        # the stack's own writes decide, not the model's SpliceCore: an fp32 checkpoint's trained tensors are
        # off the grid with no edit at all
        unrounded = quant_format in GPTQ_FORMATS and not all(on_grid(p.after, quant_format) for p in stack.list())
        if unrounded and push_rounding in ("gptq", "plain"):
            raise FelixError(f"{stack.dir}: the patch stack holds unrounded edits (`felix splice apply` on an "
                             f"artifact keeps them so), which are served folded onto the {quant_format} grid "
                             f"with every later write: serve with --push-rounding fold or auto, not {push_rounding}")
        folding = push_rounding == "fold" or unrounded and push_rounding == "auto"
        if not folding and quant_format not in FP32_FORMATS and quant_format != ckpt.quant_format:
            try:  # as deployed: SpliceCore as `felix quantize` stores it, so pushes land on a model on the grid
                requantizer(quant_format)(model)
            except FelixError as exc:
                raise FelixError(f"{ckpt.path}: cannot serve as {quant_format}: {exc}") from None
        stack.restore(model)
        rounding, note, fold = None, None, None
        if folding:
            fold = StackFold.of_checkpoint(ckpt, model, quant_format)
        elif push_rounding != "plain" and quant_format in GPTQ_FORMATS:
            try:
                rounding = PushRounding(preservation_windows(ckpt, model), quant_format)
            except FelixError as exc:
                if push_rounding == "gptq":
                    raise FelixError(f"GPTQ push rounding needs the checkpoint's training text: {exc}") from None
                note = f"pushed tensors are rounded plainly: GPTQ rounding needs the checkpoint's training text ({exc})"
        return cls(model, tok, stack, model_id, quant_format, rounding, note, fold)

    def close(self) -> None:
        """Let go of the patch stack's write lock, so `felix splice apply`/`rollback` at the checkpoint are no
        longer refused, and refuse every later write (503 SHUTTING_DOWN); closing again does nothing. Reads
        go on (completions in flight keep their snapshot). A write in flight is not waited for (the server's
        shutdown did, up to its grace): the stack's own flock keeps its commit whole, and a CLI write that read
        the stack before that commit is refused (`StackChanged`), never interleaved."""
        self.closed = True
        lock, self.stack_lock = self.stack_lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> SpliceService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompts --------------------------------------------------------------------------------
    def chat_ids(self, messages: Any, system: Any = None) -> list[int]:
        """The prompt of a chat in the template (`felix.chat`), ending with `<|assistant|>`."""
        try:
            return chat_ids(self.tok, chat_turns(messages, system))
        except FelixError as exc:  # a ChatFormatError, or text that is not Unicode (a "\ud800" escape)
            raise bad_request(str(exc)) from None

    def prompt_ids(self, prompt: str) -> list[int]:
        """`prompt` as raw text; a 400 when it is not Unicode (a lone surrogate from a "\ud800" escape)."""
        try:
            return self.tok.encode(prompt)
        except FelixError as exc:
            raise bad_request(f"'prompt': {exc}", param="prompt") from None

    def _check_ablate(self, layers: Any) -> list[int]:
        if layers is None:
            return []
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise bad_request("'ablate_layers' must be a list of layer numbers")
        unknown = sorted(set(layers) - set(self.splice_layers))
        if unknown:
            raise bad_request(f"ablate_layers {unknown} have no SpliceCore (SpliceCore layers: {self.splice_layers})")
        return sorted(set(layers))

    # -- generation -----------------------------------------------------------------------------
    def generate(self, ids: list[int], p: GenParams) -> Iterator[Delta | GenResult]:
        """Text deltas as they become final, then one GenResult, all from the state served now (a write
        made meanwhile does not reach it). Exhaust or `close()` it: it holds that state's model till then."""
        model = self.model  # the snapshot, taken once: every token comes from this state
        if not ids:
            raise bad_request("the prompt is empty")
        if len(ids) >= model.cfg.max_seq_len:
            raise bad_request(f"prompt of {len(ids)} tokens leaves no room in max_seq_len {model.cfg.max_seq_len}")
        return stream_completion(model, self.tok, ids, p, self.stop_ids)

    def run(self, ids: list[int], p: GenParams) -> GenResult:
        result = None
        for item in self.generate(ids, p):
            if isinstance(item, GenResult):
                result = item
        assert result is not None
        return result

    # -- daemon API -----------------------------------------------------------------------------
    def complete(self, body: dict) -> dict:
        """POST /api/v1/complete. `prompt` alone is continued as raw text (how edits are evaluated);
        `messages`, or `prompt` with `system`, go through the chat template. Temperature 0 (default)
        is greedy; mean_prob/min_prob are the model's probabilities of the tokens it produced."""
        prompt, messages, system = body.get("prompt"), body.get("messages"), body.get("system")
        if messages is not None and prompt is not None:
            raise bad_request("give 'prompt' or 'messages', not both", param="prompt")
        if messages is not None:
            ids = self.chat_ids(messages, system)
        elif isinstance(prompt, str) and prompt:
            ids = self.chat_ids([{"role": "user", "content": prompt}], system) if system is not None \
                else self.prompt_ids(prompt)
        else:
            raise bad_request("give a non-empty 'prompt' string or 'messages'")
        want_json = json_mode(body.get("response_format"))
        p = GenParams(max_tokens=int_field(body, "max_tokens", 64, 1, 1 << 20),
                      temperature=number_field(body, "temperature", 0.0, 0.0, 2.0),
                      seed=int_field(body, "seed", None, 0, 2**63 - 1),
                      ablate=self._check_ablate(body.get("ablate_layers")))
        r = self.run(ids, p)
        out = {"content": r.text, "stop_reason": r.stop_reason, "tokens_used": r.prompt_tokens + r.completion_tokens,
               "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
               "mean_prob": sum(r.probs) / len(r.probs), "min_prob": min(r.probs), "elapsed_ms": r.elapsed_ms}
        if want_json:  # decoding is not constrained; say whether the output parses
            out["json_valid"] = parses_as_json(r.text)
        return out

    def status(self) -> dict:
        """GET /api/v1/splice/status: per SpliceCore layer norms, gate, rank; the patch stack."""
        self._require_splice()
        served = self.served  # one snapshot: its layers and its patches agree
        layers = {}
        for layer, core in served.model.splice_cores().items():
            gate = float(core.gate)
            # in float64: the norm of finite float32 values can overflow float32, and inf is not JSON
            layers[str(layer)] = {"rank": core.rank, "gate": gate, "gate_bias": gate - 1.0,
                                  "a_norm": norm64(core.a), "b_norm": norm64(core.b),
                                  "delta_norm": norm64(gate * (core.b.double() @ core.a.double()))}
        bound = self.bound.of(served.model)
        return {"status": "ok", "n_layers": len(layers), "model_layers": served.model.cfg.n_layers,
                "format": self.quant_format or "f32",
                "push_rounding": self.push_rounding_name,
                # the residual stream's norm bound over every input (None: past float64); writes keep it, and
                # each SpliceCore's A·u and gate·B, under the limit
                "activation_bound": {"residual": bound.residual if math.isfinite(bound.residual) else None,
                                     "limit": LIMIT, "within": bound.worst() is None},
                "layers": layers, "patches": list(served.patches)}

    # -- OpenAI-compatible API ------------------------------------------------------------------
    def models(self) -> dict:
        """GET /v1/models: the served model, the only one."""
        return {"object": "list", "data": [self._model_object()]}

    def retrieve_model(self, body: dict) -> dict:
        """GET /v1/models/{model} (the id in `body["model"]`): the served model, or OpenAI's 404
        `model_not_found` for any other id."""
        check_model(body, self.model_id)
        return self._model_object()

    def _model_object(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "felix"}

    def chat_request(self, body: dict) -> tuple[list[int], GenParams, bool, bool]:
        """Validate a /v1/chat/completions body: (prompt ids, params, stream, include_usage); each field is
        implemented, harmless and ignored, or refused by name (`felix.server_chat`)."""
        p, stream, include_usage = chat_params(body, self.model_id, self.model.cfg.max_seq_len)
        return self.chat_ids(body.get("messages")), p, stream, include_usage
