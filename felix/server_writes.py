"""The splice server's writes (`/api/v1/splice/tensor`, `/edit`, `/rollback`), free of HTTP: `SpliceWrites`,
which `felix.server_api.SpliceService` is made of with its reads (completions, chat, status).

Consistency, read-copy-update: the served state is one immutable snapshot (`Served`: a model and the
patch rows status reports), replaced whole by a single attribute assignment. A completion takes the
snapshot once, when its request is read, and generates on that model to its last token; status reports one
snapshot. Splice writes (tensor pushes, gate edits, rollbacks) run one at a time on `twin`, a copy of the
model that shares every weight but SpliceCore's (`FelixLM.splice_twin`) and holds the patch stack's state:
the slow part of a write (GPTQ rounding of a push, folding the stack: forward passes that read the model
through hooks) runs there, then the write publishes a new snapshot, a twin of the served model with the new
SpliceCore state. So completions never wait for writes nor writes for completions: one running across a
write finishes on the state it began with, and every one started after the swap sees the whole write. An
old snapshot's model is freed with its last completion (it shares every big tensor: SpliceCore alone is
its own).

Gate semantics (`/api/v1/splice/edit`): a layer's gate buffer is set to `1 + bias`. The trained default
gate is 1, so bias 0 restores it, bias -1 ablates the layer's SpliceCore (gate 0, which is what
`ablate_layers` does for one request), and setting a bias twice does not accumulate.
"""

from __future__ import annotations

import base64
import binascii
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from felix.activation_bound import HEADROOM, LIMIT, ActivationBound
from felix.errors import FelixError
from felix.model import FelixLM
from felix.patches import PatchStack, StackChanged
from felix.server_common import ApiError, bad_request, finite_number, known_fields
from felix.splice_data import stack_edits
from felix.splice_fold import StackFold
from felix.splice_quant import PushRounding, requantize_splice
from felix.tokenizer import FelixTokenizer

# how much harder than the probe prompt another input may drive SpliceCore without overflowing (2^20)
PROBE_HEADROOM = float(1 << 20)


def _stack_changed(exc: StackChanged) -> ApiError:
    """The answer to a write refused because the stack on disk is no longer the one served: 409, not 500 (the
    server is fine; its view of the stack is stale, and only a restart reads the stack again)."""
    return ApiError(409, "SPLICE_STACK_CHANGED", f"{exc.path} was changed by another process since this server "
                    "read it: nothing was applied, and what is served may no longer be the stack on disk; restart "
                    "felix serve to serve the stack as it is now (while it runs, write only through its API)")


@dataclass(frozen=True)
class Served:
    """What completions and status read: never changed once published (a write publishes a new one)."""

    model: FelixLM
    patches: tuple[dict, ...]  # the patch stack's rows, as `status` reports them


class SpliceWrites:
    """The write endpoints and the snapshot they publish. `SpliceService.__init__` sets the state below."""

    tok: FelixTokenizer
    stack: PatchStack
    quant_format: str | None  # None: served in fp32
    push_rounding: PushRounding | None
    fold: StackFold | None
    twin: FelixLM  # the model writes are made on: it holds the stack's state (unrounded under a fold)
    writing: threading.Lock  # one write at a time
    served: Served
    shapes: dict[str, tuple[int, ...]]
    splice_layers: list[int]
    probe_ids: torch.Tensor
    bound: ActivationBound  # the twin's frozen weights' part of the activation bound
    closed: bool  # set by `SpliceService.close`: every later write is refused

    @property
    def model(self) -> FelixLM:
        """The model served now; never change it in place (completions may be running on it)."""
        return self.served.model

    @property
    def push_rounding_name(self) -> str | None:
        """How pushed tensors are rounded: "fold" (with the whole stack), "gptq", "plain", or None when the
        model is served in fp32."""
        if not self.quant_format:
            return None
        return "fold" if self.fold else "gptq" if self.push_rounding else "plain"

    def _require_splice(self) -> None:
        if not self.splice_layers:
            raise ApiError(503, "SPLICE_UNAVAILABLE", "this model has no SpliceCore layers")

    def _check_open(self) -> None:
        """Refuse a write once the service is closed (the caller holds `writing`): it no longer holds the
        patch stack's lock, so another process may be writing the stack."""
        if self.closed:
            raise ApiError(503, "SHUTTING_DOWN", "the server is shutting down: splice writes are refused; retry "
                           "once it is back")

    def _apply(self, after: dict[str, torch.Tensor], record: dict,
               prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> str:
        """Write `after` as one patch; `prepare` first maps it on the twin (it may read the model through
        hooks, which the served model's completions must not fire)."""
        with self.writing:
            self._check_open()
            try:
                if prepare is not None:
                    after = prepare(after)
                self._check_finite_outputs(after)
                # every server write sets its tensors (a rollback below it keeps them): absolute
                return self._write(lambda: self.stack.apply(self.twin, after, record, absolute=True)).id
            except StackChanged as exc:
                raise _stack_changed(exc) from None
            except FelixError as exc:  # inputs were validated, so this is a rounding/write/persist failure
                raise ApiError(500, "SPLICE_TENSOR_ERROR", str(exc)) from None

    def _check_finite_outputs(self, after: dict[str, torch.Tensor]) -> None:
        """Refuse tensors with which the model's activations could overflow: finite float32 values can still
        overflow the forward pass (a tensor of 3e38s), and the served model must never sample from NaN, nor
        from the zeros RMSNorm returns once the residual's sum of squares overflows.

        First the bound over every input (`ActivationBound`): the state must keep it `LIMIT` or under. Then
        the probe prompt runs with every SpliceCore's output `PROBE_HEADROOM` times larger than the state gives
        it, a gated-off one as if its gate were 1 (a gate edit or a rollback can turn it on)."""
        before = self.twin.splice_state()
        try:
            self.twin.load_splice_state(after, strict=False)
            worst = self.bound.of(self.twin).worst()
            if worst is not None:
                what, value = worst
                raise ApiError(400, "SPLICE_BAD_DATA", f"{', '.join(sorted(after))}: with these values {what} "
                               f"could reach a norm of {value:.3g} on some input, past {LIMIT:.3g} ({HEADROOM:g} "
                               "times below where float32 RMSNorm overflows and zeroes the model's output); "
                               "nothing applied")
            with torch.no_grad():
                for core in self.twin.splice_cores().values():
                    core.gate.copy_(core.gate.masked_fill(core.gate == 0, 1.0) * PROBE_HEADROOM)
                finite = bool(torch.isfinite(self.twin(self.probe_ids)).all())
        finally:
            self.twin.load_splice_state(before)
        if not finite:
            raise ApiError(400, "SPLICE_BAD_DATA", f"{', '.join(sorted(after))}: with these values the model's "
                           f"outputs are not finite, or would be on inputs that drive SpliceCore {PROBE_HEADROOM:g} "
                           "times harder than a probe prompt; nothing applied")

    def _rollback_outputs_finite(self, value: dict[str, torch.Tensor]) -> None:
        """A rollback's tensors pass the probe a write's do. Each was probed when written, but beside other
        tensors: removing a patch from the middle joins values that were never served together (a large `a`
        from below it with a large `b` pushed above it)."""
        try:
            self._check_finite_outputs(value)
        except ApiError:
            raise ApiError(409, "SPLICE_BAD_DATA", f"rolling this patch back would set {', '.join(sorted(value))} to "
                           "values with which the model's outputs are not finite (tensors written at different "
                           "times, never served together); roll back the later patches first. Nothing rolled "
                           "back") from None

    def _write(self, op: Callable[[], Any]) -> Any:
        """Run a stack write on the twin (the caller holds `writing`), then serve its result: publish a twin
        of the served model holding the twin's state, or under a fold the fold of it.

        A write that fails changes nothing. If the fold fails after the write, the stack and the twin keep
        the write and the model goes on serving the last fold; the next write folds the whole stack again."""
        before = self.twin.splice_state()
        try:
            result = op()
        except BaseException:
            self.twin.load_splice_state(before)
            raise
        folded = None if self.fold is None else \
            self.fold.served(self.twin, stack_edits(self.stack, self.tok, self.model.cfg.max_seq_len))
        state = self.twin.splice_state() if folded is None else folded  # None: the twin is on the grid
        served = self.model.splice_twin()  # the running completions' model is never written
        served.load_splice_state(state)
        self.served = Served(served, self._patch_rows())  # one assignment: a completion sees all of it or none
        return result

    def _patch_rows(self) -> tuple[dict, ...]:
        return tuple({"id": p.id, "method": p.record.get("method"), "time": p.record.get("time"), "names": p.names,
                      "absolute": p.absolute}
                     for p in self.stack.list())

    def push_tensor(self, body: dict) -> dict:
        """POST /api/v1/splice/tensor: little-endian float32 data for one named SpliceCore tensor."""
        self._require_splice()
        t0 = time.perf_counter()
        known_fields(body, "/api/v1/splice/tensor", frozenset({"name", "data", "dtype"}))
        name, data, dtype = body.get("name"), body.get("data"), body.get("dtype") or "f32"
        if name is not None and not isinstance(name, str) or data is not None and not isinstance(data, str):
            raise bad_request("'name' and 'data' must be strings")
        if not name:
            raise ApiError(400, "SPLICE_EMPTY_NAME", "tensor name is required")
        if not data:
            raise ApiError(400, "SPLICE_EMPTY_DATA", "tensor data is required")
        if dtype != "f32":
            raise bad_request(f"unsupported dtype {dtype!r}: send float32 data with dtype \"f32\"")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "SPLICE_BAD_DATA", f"invalid base64 data: {exc}") from None
        if len(raw) % 4:
            raise ApiError(400, "SPLICE_BAD_DATA", "f32 data must be a multiple of 4 bytes")
        if name not in self.shapes:
            raise ApiError(404, "SPLICE_TENSOR_ERROR", f"unknown SpliceCore tensor {name!r} "
                           f"(names look like layers.{self.splice_layers[0]}.mlp.splice.a|b|gate)")
        shape = self.shapes[name]
        values = np.frombuffer(raw, dtype="<f4")
        if values.size != math.prod(shape):
            raise ApiError(400, "SPLICE_TENSOR_ERROR", f"{name} has shape {list(shape)} ({math.prod(shape)} "
                           f"elements); got {values.size}")
        tensor = torch.from_numpy(values.astype(np.float32)).reshape(shape)
        if not torch.isfinite(tensor).all():
            raise ApiError(400, "SPLICE_BAD_DATA", f"{name}: data contains NaN or inf")
        try:  # plain rounding also checks that the tensor fits the format when GPTQ will round it
            plain = requantize_splice(name, tensor, self.quant_format)
        except FelixError as exc:  # the tensor does not fit the deployment format (e.g. partial blocks)
            raise ApiError(400, "SPLICE_TENSOR_ERROR", f"{name}: cannot re-quantize to {self.quant_format}: {exc}") \
                from None
        rounding = self.push_rounding
        request = {"endpoint": "/api/v1/splice/tensor", "name": name, "nelem": int(values.size),
                   "format": self.quant_format or "f32"}
        if self.quant_format:
            request["rounding"] = self.push_rounding_name
        prepare = None
        if rounding is not None:
            def prepare(after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                edits = stack_edits(self.stack, self.tok, self.model.cfg.max_seq_len)
                return {name: rounding(self.twin, name, after[name], edits)}
        patch_id = self._apply({name: tensor if rounding or self.fold else plain},
                               {"method": "tensor_push", "request": request},
                               prepare)
        return {"status": "ok", "name": name, "nelem": int(values.size), "dtype": "f32",
                "elapsed_us": int((time.perf_counter() - t0) * 1e6), "patch_id": patch_id}

    def edit_gates(self, body: dict) -> dict:
        """POST /api/v1/splice/edit: gate = 1 + bias per layer, all layers in one patch or none."""
        self._require_splice()
        t0 = time.perf_counter()
        known_fields(body, "/api/v1/splice/edit", frozenset({"gate_biases"}))
        biases = body.get("gate_biases")
        if not isinstance(biases, dict) or not biases:
            raise bad_request("'gate_biases' must be a non-empty object {\"<layer>\": float}")
        errors, after = [], {}
        for key, bias in biases.items():
            # int() refuses over 4300 digits; no layer number is near that long
            layer = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9 else None
            value = finite_number(bias)
            if value is not None:
                value = finite_number(1.0 + value)  # the gate itself must be a finite float32
            if layer not in self.splice_layers:
                errors.append(f"layer {key!r}: no SpliceCore there (SpliceCore layers: {self.splice_layers})")
            elif value is None:
                errors.append(f"layer {key!r}: bias must be a finite number (the gate 1 + bias a float32)")
            else:
                after[f"layers.{layer}.mlp.splice.gate"] = torch.tensor(value)
        if errors:
            raise bad_request("gate_biases rejected; nothing applied", errors)
        record = {"method": "gate_bias", "request": {"endpoint": "/api/v1/splice/edit", "gate_biases": biases}}
        patch_id = self._apply(after, record)
        return {"status": "ok", "applied": len(after), "elapsed_us": int((time.perf_counter() - t0) * 1e6),
                "patch_id": patch_id}

    def rollback(self, body: dict) -> dict:
        """POST /api/v1/splice/rollback: remove `patch_id`, or the top patch when none is given."""
        self._require_splice()
        t0 = time.perf_counter()
        known_fields(body, "/api/v1/splice/rollback", frozenset({"patch_id"}))
        pid = body.get("patch_id")
        if pid is not None and not isinstance(pid, str):
            raise bad_request("'patch_id' must be a string")
        with self.writing:
            self._check_open()
            if pid is None:
                top = self.stack.top()
                if top is None:
                    raise ApiError(409, "SPLICE_BAD_REQUEST", "no patches to roll back")
                pid = top.id
            if pid not in {p.id for p in self.stack.list()}:
                raise ApiError(404, "SPLICE_BAD_REQUEST", f"no patch {pid!r}")
            try:
                self._write(lambda: self.stack.rollback(self.twin, pid, check=self._rollback_outputs_finite))
            except StackChanged as exc:
                raise _stack_changed(exc) from None
            except FelixError as exc:
                raise ApiError(500, "SPLICE_TENSOR_ERROR", str(exc)) from None
            remaining = len(self.stack)
        return {"status": "ok", "rolled_back": pid, "remaining": remaining,
                "elapsed_us": int((time.perf_counter() - t0) * 1e6)}

