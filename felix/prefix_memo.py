"""Skip the blocks an edit cannot change, when the same ids are run again.

Splice edits write SpliceCore tensors and nothing else, so the residual stream entering the lowest block whose
SpliceCore differs from where it began is a function of the ids alone. A bench or an edit's budget runs the same
held-out windows, neutral prompts and edit prompts after every edit; with a memo on the model each of those
forwards starts at that block from the residual kept the first time, not at the embedding. The edits of the
53.4M facts model wrote layers 9 and 11 of 12: three blocks of twelve run per forward instead of all of them.

Only no-grad forwards without a KV cache or per-block outputs are served, and every block from the lowest one a
forward hook reads runs; a changed frozen weight (any in-place write bumps its version counter) empties the
memo. The kept residual is the one the full forward computes, so the result is bitwise the same.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from felix.model import FelixLM

MAX_BYTES = 1 << 30  # residuals kept at most (least recently used dropped first)
F = TypeVar("F", bound=Callable)


class PrefixMemo:
    """Per input ids: the residual entering some block, computed while every SpliceCore below it held its
    reference state (the state when the memo was made, or its frozen weights last changed)."""

    def __init__(self, model: FelixLM, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._reset(model)

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of the model (a twin, a quantized copy) starts without one: what is kept belongs to these
        tensors, and copying it would copy up to `max_bytes`."""
        return None

    def _reset(self, model: FelixLM) -> None:
        self.reference = {layer: tuple(t.detach().clone() for t in (c.a, c.b, c.gate))
                          for layer, c in model.splice_cores().items()}
        self.frozen = _frozen_versions(model)
        self.entries: OrderedDict[bytes, dict[int, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    def first_changed(self, model: FelixLM) -> int:
        """The lowest block whose SpliceCore differs from the reference; when none does, the highest SpliceCore
        block (the last block for a model without SpliceCore): no block below it can differ."""
        cores = model.splice_cores()
        for layer in sorted(cores):
            c = cores[layer]
            if not all(torch.equal(t, r) for t, r in zip((c.a, c.b, c.gate), self.reference[layer], strict=True)):
                return layer
        return max(cores, default=len(model.layers) - 1)

    def residual(self, model: FelixLM, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 stop: int | None = None) -> torch.Tensor:
        """The residual after block `stop` - 1 (default: the last) for `idx` (no KV cache), as the full forward
        computes it. The tensor returned must not be written in place."""
        if _frozen_versions(model) != self.frozen:
            self._reset(model)
        stop = len(model.layers) if stop is None else stop
        start = min(self.first_changed(model), stop, _first_hooked(model))
        key = _ids_key(idx)
        kept = self.entries.get(key, {})
        below = [layer for layer in kept if layer <= start]
        if below:
            self.hits += 1
            self.entries.move_to_end(key)
            first = max(below)
            x = kept[first]
        else:
            self.misses += 1
            x = model.tok_emb(idx)
            for block in model.layers[:start]:
                x = block(x, cos, sin)
            if start:  # the embedding alone is not worth keeping
                self._keep(key, start, x)
            first = start
        for block in model.layers[first:stop]:
            x = block(x, cos, sin)
        return x

    def _keep(self, key: bytes, layer: int, x: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        if size > self.max_bytes:
            return
        self.entries.setdefault(key, {})[layer] = x
        self.entries.move_to_end(key)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in dropped.values())


def _first_hooked(model: FelixLM) -> int:
    """The lowest block that a forward hook reads (on it or inside it; 0 for the embedding), the block count when
    none does: a hook on a skipped block would not run, and what it collects (keys, attributions) would be
    missing."""
    if model.tok_emb._forward_hooks or model.tok_emb._forward_pre_hooks:
        return 0
    for i, block in enumerate(model.layers):
        if any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()):
            return i
    return len(model.layers)


def _frozen_versions(model: FelixLM) -> tuple[tuple[int, int, int], ...]:
    """Identity, storage and version counter of every tensor outside SpliceCore: an in-place write bumps the
    version, and `.data =` moves the storage."""
    splice = {id(t) for c in model.splice_cores().values() for t in (*c.parameters(), *c.buffers())}
    return tuple((id(t), t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers())
                 if id(t) not in splice)


def _ids_key(idx: torch.Tensor) -> bytes:
    """The ids, and the autocast they run under (a residual kept in bf16 is not the fp32 one)."""
    kind = idx.device.type
    autocast = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind)
    ids = idx.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.blake2b(repr((tuple(ids.shape), kind, autocast)).encode(), digest_size=16)
    h.update(ids.numpy().tobytes())
    return h.digest()


@contextmanager
def prefix_memo(model: FelixLM, max_bytes: int = MAX_BYTES) -> Iterator[PrefixMemo]:
    """`model`'s no-grad forwards served by a `PrefixMemo` inside the block (one already on it is kept)."""
    if model.prefix_memo is not None:
        yield model.prefix_memo
        return
    model.prefix_memo = memo = PrefixMemo(model, max_bytes)
    try:
        yield memo
    finally:
        model.prefix_memo = None


def memoized_prefix(fn: F) -> F:
    """`fn(model, ...)` with `model`'s no-grad forwards served by a `PrefixMemo` while it runs."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with prefix_memo(model):
            return fn(model, *args, **kwargs)

    return wrapped  # type: ignore[return-value]
