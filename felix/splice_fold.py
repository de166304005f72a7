"""Serving a stack of unrounded edits on a quantized artifact: the stack folded onto the grid once.

`felix splice apply` on a `felix quantize` artifact in a codebook format keeps each edit's patch
unrounded. What the artifact serves is the whole stack GPTQ-rounded once (`gptq_requantizer`, as
`felix quantize` rounds a spliced checkpoint), wherever it is served: rounding after every edit re-rounds
the earlier ones each time and loses them (EXP-46z: 41% of 100 edits held, against 98% folded once).

A fold costs a forward pass over the preservation text and a GPTQ pass per SpliceCore layer (about 13 s
at 16.1M parameters on 2 CPU threads), so the fold of the current stack is stored beside it
(`splices/fold.safetensors`) under a digest of everything the fold reads: the model's weights with the
unrounded SpliceCore, the preservation windows, the fact edits' token ids, the format and the fold's
settings (and a digest of its own tensors: a damaged fold is folded again, never served). A loader whose
digest matches serves the stored fold, so every loader serves the fold
`felix splice apply` judged, bit for bit, whatever device or thread count it runs on (GPTQ's rounding
decisions flip on float-level differences, which another device's kernels give). The store keeps the
folds of the last `FOLD_ENTRIES` stacks recorded, so a rollback (a server's too) serves the fold that was
judged for the stack it returns to, without folding. A server's write that changes one layer (a pushed
tensor) resumes the last fold it served at that layer (`StackFold.served`): the layers below are as that
fold rounded them, and the blocks above read the residual stream it recorded entering the layer (for a fold
read from the store, as a server starts, the stream is walked up to through its rounded layers first).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from felix.atomic import atomic_path
from felix.checkpoint import tensor_bytes, tensors_digest
from felix.errors import FelixError
from felix.patch_format import FOLD_FILE, SPLICES_DIR
from felix.splice_covariance import BottomUpCovariances
from felix.splice_data import preservation_windows, stack_edits
from felix.splice_quant import GPTQ_FORMATS, gptq_requantizer, on_grid
from felix.splicecore import splice_tensor_layer

log = logging.getLogger(__name__)

# Part of every digest: bump it when the fold's arithmetic changes, so folds stored by older code are redone.
FOLD_VERSION = 2  # 2: SpliceCore hashed last, layer by layer (fold_digests)
DIGESTS_KEY = "felix_fold_digests"  # metadata: the stored folds' digests, most recently recorded first
CONTENTS_KEY = "felix_fold_contents"  # metadata: a digest of each stored fold's own tensors, to find damaged ones
FOLD_ENTRIES = 8  # folds kept: a rollback to any of the last 7 stacks is served from the store


def fold_digests(model, edits: Sequence, preserve: torch.Tensor, fmt: str,
                 edit_share: float) -> tuple[str, dict[int, str]]:
    """`fold_digest`, and per SpliceCore layer L the digest of what the fold of the layers below L reads:
    the same inputs less the SpliceCore tensors of L and above. Equal digests at L mean a fold may resume at
    L from an earlier fold's rounded layers below it (chained: equal at L means equal at every layer below)."""
    h = hashlib.blake2b(digest_size=32)

    def add(data: bytes | memoryview) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    def add_tensor(name: str, t: torch.Tensor) -> None:
        add(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        add(tensor_bytes(t))

    add(json.dumps({"fold_version": FOLD_VERSION, "format": fmt, "edit_share": edit_share,
                    "model": model.cfg.model_dump()}, sort_keys=True).encode())
    add(tensor_bytes(preserve.long()))
    for ex in edits:
        add(json.dumps([ex.n_prompt, list(ex.ids)]).encode())
    state = model.state_dict()
    splice = {layer: f"layers.{layer}.mlp.splice." for layer in model.splice_cores()}
    for name in sorted(state):
        if not name.startswith(tuple(splice.values())):
            add_tensor(name, state[name])
    below: dict[int, str] = {}
    for layer in sorted(splice):
        below[layer] = h.copy().hexdigest()
        for name in sorted(n for n in state if n.startswith(splice[layer])):
            add_tensor(name, state[name])
    return h.hexdigest(), below


def fold_digest(model, edits: Sequence, preserve: torch.Tensor, fmt: str, edit_share: float) -> str:
    """A digest of everything a fold of `model`'s SpliceCore reads: every weight (SpliceCore as it is,
    unrounded), the model's shape, the preservation windows, the edits' token ids, the format and settings."""
    return fold_digests(model, edits, preserve, fmt, edit_share)[0]


@dataclass
class _FoldTrace:
    """The last fold served here (made or read from the store), kept to resume the next one: the digests below
    each layer, the folded SpliceCore, and per layer the residual stream entering its block (one tensor per
    preservation chunk, on the CPU) where recorded; a missing stream is walked up to when needed."""

    below: dict[int, str]
    state: dict[str, torch.Tensor]
    entering: dict[int, list[torch.Tensor]]


class StackFold:
    """What a model served in a codebook format holds for a stack of unrounded edits: all of SpliceCore
    GPTQ-rounded once by `gptq_requantizer`, weighted by the preservation text and every fact edit's keys.

    This is what `felix quantize` packs for a spliced fp32 checkpoint; here it is recomputed from the
    stack whenever the stack changes, so the stack keeps exact, unrounded tensors. With a `store` (a
    stack's `fold.safetensors`), `serve` reads a fold of the same inputs from it instead of folding, and
    records each fold it makes.
    """

    def __init__(self, preserve: torch.Tensor, fmt: str, edit_share: float = 0.5, store: Path | None = None):
        if fmt not in GPTQ_FORMATS:
            raise FelixError(f"folding a patch stack needs a codebook format ({', '.join(GPTQ_FORMATS)}), not {fmt}")
        self.preserve, self.fmt, self.edit_share = preserve, fmt, edit_share
        self.store = None if store is None else Path(store)
        self._trace: _FoldTrace | None = None  # the last fold served here, made or read from the store
        self.resumed_from: int | None = None  # the layer that fold started at; None: it folded every layer

    @classmethod
    def of_checkpoint(cls, ckpt, model, fmt: str | None = None, stored: bool = True) -> StackFold:
        """The fold for checkpoint `ckpt` served in `fmt` (default: the artifact's own format), on its data
        mix's preservation windows; `stored`: kept in its patch stack's directory."""
        fmt = fmt or ckpt.quant_format
        try:
            preserve = preservation_windows(ckpt, model)
        except FelixError as exc:
            raise FelixError(f"{ckpt.path}: a patch stack served in {fmt} is rounded over the checkpoint's training "
                             f"text, which is unreadable: {exc}") from None
        return cls(preserve, fmt, store=Path(ckpt.path) / SPLICES_DIR / FOLD_FILE if stored else None)

    def needed(self, model) -> bool:
        """Whether `model`'s SpliceCore is off the format's grid (an empty or rounded stack needs no fold)."""
        return not on_grid(model.splice_state(), self.fmt)

    def digest(self, model, edits: Sequence = ()) -> str:
        """The digest a fold of `model` (holding the unrounded stack) over `edits` is stored under."""
        return fold_digest(model, edits, self.preserve, self.fmt, self.edit_share)

    def __call__(self, model, edits: Sequence = ()) -> None:
        """Round `model`'s SpliceCore in place; `edits`: the stack's fact edits (`stack_edits`).

        A pure function of the model, the edits and the text: its input moments are measured afresh, never
        taken from a cache another computation filled (GPTQ's rounding decisions flip on float-level
        differences), so the fold `felix splice apply` judges is the one a loader computes."""
        if self.needed(model):
            gptq_requantizer(self.preserve, edits, self.fmt, self.edit_share)(model)

    def serve(self, model, edits: Sequence = ()) -> None:
        """Fold `model` in place: from the store when it holds this stack's fold, else by folding and
        storing the result."""
        state = self.served(model, edits)
        if state is not None:
            model.load_splice_state(state)

    def served(self, model, edits: Sequence = ()) -> dict[str, torch.Tensor] | None:
        """The SpliceCore state `model` (holding the unrounded stack) is served as, leaving `model` as it is:
        the stored fold of these inputs when the store holds one, else a fresh fold, recorded. None when
        `model` is on the grid already, so it serves itself.

        A fresh fold resumes the last fold served here at the lowest layer whose inputs changed (a pushed
        tensor of layer L leaves every layer below L as that fold rounded it), which is bit for bit the
        whole fold: the layers below are the same arithmetic on the same inputs, and the blocks above read
        the residual stream that fold recorded entering L, or, for a fold read from the store, the stream
        walked up to L through its rounded layers (the walk a fold makes, without the rounding; bit for bit
        where the stored fold was made on this device). Memory: that stream at each SpliceCore layer, one
        d_model vector per preservation token (150 MB at 16.1M parameters, about 800 MB at felix-300m)."""
        if not self.needed(model):
            return None
        own = model.splice_state()
        digest, below = fold_digests(model, edits, self.preserve, self.fmt, self.edit_share)
        stored = self._read(digest)
        if stored is not None:
            if {k: tuple(v.shape) for k, v in stored.items()} == {k: tuple(v.shape) for k, v in own.items()}:
                self._trace = _FoldTrace(below, stored, {})  # a later write resumes from it
                self.resumed_from = None
                return stored
            log.warning("%s: the stored fold does not fit the model; folding the stack again", self.store)
        try:
            self._fold(model, edits, below)
            state = model.splice_state()
        finally:
            model.load_splice_state(own)
        self.record(digest, state)
        return state

    def _fold(self, model, edits: Sequence, below: dict[int, str]) -> None:
        """Fold `model` in place, from the highest layer below which nothing the fold reads changed since the
        last fold made here (`below`: `fold_digests`' per-layer digests), else whole; keep its trace."""
        last, self._trace = self._trace, None  # a fold that fails leaves no trace to resume from
        # equal digests at a layer mean the same model (its config is hashed), so its stream was recorded
        start = 0 if last is None else max((layer for layer, d in below.items() if last.below.get(layer) == d),
                                           default=0)
        fold = gptq_requantizer(self.preserve, edits, self.fmt, self.edit_share)
        if start:
            below_start = {k: v for k, v in last.state.items() if splice_tensor_layer(k) < start}
            model.load_splice_state(below_start, strict=False)
            missing = [layer for layer in sorted(below) if layer <= start and layer not in last.entering]
            if missing:  # a fold read from the store: walk the text up through its rounded layers below
                last.entering |= BottomUpCovariances(model, self.preserve).streams(missing)
            entering = {layer: x for layer, x in last.entering.items() if layer < start}
            entering |= fold(model, start, last.entering[start], record=True)
            log.info("folded SpliceCore layers %d and above (the layers below are as the last fold left them)", start)
        else:
            entering = fold(model, record=True)
        self.resumed_from = start or None
        self._trace = _FoldTrace(below, model.splice_state(), entering)

    def record(self, digest: str, state: dict[str, torch.Tensor]) -> None:
        """Store `state` as the fold under `digest` (atomically), first of the `FOLD_ENTRIES` kept; a store
        that cannot be written is only a lost shortcut, so that is a warning."""
        if self.store is None:
            return
        entries = [(digest, state), *[(d, t) for d, t in self._entries() if d != digest]][:FOLD_ENTRIES]
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, (_, t) in enumerate(entries) for k, v in t.items()}
        try:
            with atomic_path(self.store) as tmp:
                save_file(tensors, str(tmp), metadata={
                    DIGESTS_KEY: json.dumps([d for d, _ in entries]),
                    CONTENTS_KEY: json.dumps([tensors_digest(t) for _, t in entries]), "format": self.fmt})
        except OSError as exc:
            log.warning("%s: could not store the fold (%s); each load will fold the stack again", self.store, exc)

    def stored_digests(self) -> list[str]:
        """The digests of the stored folds, most recently recorded first."""
        return [d for d, _ in self._entries()]

    def _read(self, digest: str) -> dict[str, torch.Tensor] | None:
        return next((t for d, t in self._entries() if d == digest), None)

    def _entries(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """The stored folds; none when there is no store, or it is unreadable (a warning) or of another layout.
        A fold whose tensors no longer match the digest recorded with them, or hold NaN or inf, is damaged:
        left out (a warning), so it is folded again rather than served."""
        if self.store is None or not self.store.is_file():
            return []
        try:
            with safe_open(str(self.store), framework="pt") as f:
                meta = f.metadata() or {}
                if DIGESTS_KEY not in meta:
                    return []  # an earlier layout (one fold, unprefixed): folded again and rewritten
                digests = json.loads(meta[DIGESTS_KEY])
                # stores written before the contents were recorded have none: their folds are checked for NaN only
                contents = json.loads(meta[CONTENTS_KEY]) if CONTENTS_KEY in meta else [None] * len(digests)
                if len(contents) != len(digests):
                    raise ValueError(f"{len(digests)} folds but {len(contents)} contents digests")
                entries: list[tuple[str, dict[str, torch.Tensor]]] = [(d, {}) for d in digests]
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    i, _, name = key.partition(".")
                    entries[int(i)][1][name] = f.get_tensor(key)
        except (OSError, SafetensorError, ValueError, IndexError, TypeError) as exc:
            log.warning("%s: unreadable stored fold (%s); folding the stack again", self.store, exc)
            return []
        intact = []
        for (digest, state), expected in zip(entries, contents, strict=True):
            if expected is not None and tensors_digest(state) != expected \
                    or not all(torch.isfinite(t).all() for t in state.values()):
                log.warning("%s: the stored fold %s is damaged (its tensors changed since it was stored); "
                            "folding the stack again", self.store, str(digest)[:12])
            else:
                intact.append((digest, state))
        return intact


def restore_served(model, tok, ckpt, stack) -> None:
    """Write `stack` into `model` as the checkpoint serves it.

    On a `felix quantize` artifact in a codebook format whose stack leaves SpliceCore off the grid (edits
    made there by `felix splice apply`), the stack is folded (`StackFold.serve`: the stored fold when it
    is this stack's); anywhere else this is `stack.restore`.
    """
    stack.restore(model)
    if ckpt.quant_format in GPTQ_FORMATS and not on_grid(model.splice_state(), ckpt.quant_format):
        StackFold.of_checkpoint(ckpt, model).serve(model, stack_edits(stack, tok, model.cfg.max_seq_len))
