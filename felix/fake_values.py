"""Real values for the small integer tensors of a fake-tensor program (`KnownValues`), so that ops whose
output size depends on data (a boolean mask's selection, a count read with `int`) run under
`FakeTensorMode`. `felix.memory` uses it to size QUAIL's whitelisted positions."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class KnownValues(TorchDispatchMode):
    """Real values for the small integer and boolean tensors of a fake-tensor program, so that ops whose
    output size or value depends on data (`h[mask]`, `int(mask.sum())`) run under `FakeTensorMode`.

    Entered above a `FakeTensorMode`. When the real value of every tensor input of an op is known (a
    real tensor is its own) and every output is an integer or boolean tensor of at most `max_numel`
    elements (the token batch's size: larger ones, such as a weight's quantization codes, stay fake),
    the op also runs on the real values: random tokens (the generator advances as in a real run),
    `Whitelist.mask`, counts. A known boolean index reaches the fake op as the positions it selects,
    which is what ATen's index kernels turn it into internally; a data-dependent op whose inputs are
    all known returns its real result. Floats stay fake.
    """

    def __init__(self, fake_mode, max_numel: int) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        super().__init__()
        self.fake_mode, self.max_numel = fake_mode, max_numel
        self._values: dict[int, torch.Tensor] = {}  # id(fake tensor) -> its real value, while it lives
        self._fake_type = FakeTensor

    def _real(self, t):
        """The real value of tensor `t` (itself when it is real), None when unknown; other values pass."""
        if not isinstance(t, torch.Tensor):
            return t
        return self._values.get(id(t)) if isinstance(t, self._fake_type) else t

    def _know(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        if id(fake) not in self._values:
            weakref.finalize(fake, self._values.pop, id(fake), None)
        self._values[id(fake)] = real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

        kwargs = kwargs or {}
        values = [self._real(t) for t in _tensors((*args, *kwargs.values()))]
        known = all(v is not None for v in values)  # `is`: == on tensors would compare elements
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException) as exc:
            positional = self._masks_as_positions(args)
            if positional is not None:
                out = func(*positional, **kwargs)
            elif known:
                return self._from_real(func, args, kwargs)
            else:
                raise RuntimeError(f"memory prediction: {func}'s result depends on tensor values it does not know "
                                   f"(it knows integer tensors of up to {self.max_numel} elements)") from exc
        outs = list(_tensors([out]))
        if known and outs and self._small_integers(outs):
            for f, r in zip(outs, _tensors([self._run_real(func, args, kwargs)]), strict=True):
                self._know(f, r)
        elif any(v is not None for v in values):
            # a known input that this op writes without a real counterpart has no known value any more
            for i, arg in enumerate(func._schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                    self._values.pop(id(value), None)
        return out

    def _run_real(self, func, args, kwargs):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        def real(a):
            return [self._real(x) for x in a] if isinstance(a, (list, tuple)) else self._real(a)

        with unset_fake_temporarily():
            return func(*[real(a) for a in args], **{k: real(v) for k, v in kwargs.items()})

    def _from_real(self, func, args, kwargs):
        real_out = self._run_real(func, args, kwargs)

        def fake(r):
            if not isinstance(r, torch.Tensor):
                return r
            f = self.fake_mode.from_tensor(r)
            self._know(f, r)
            return f

        return type(real_out)([fake(r) for r in real_out]) if isinstance(real_out, (list, tuple)) else fake(real_out)

    def _masks_as_positions(self, args):
        """`args` with every known boolean index (in a list argument, as `Tensor?[] indices`) replaced by
        one long tensor of its positions per dimension; None when there is none."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        found = False

        def expand(index):
            nonlocal found
            value = self._real(index) if isinstance(index, torch.Tensor) else None
            if value is None or value.dtype not in (torch.bool, torch.uint8):
                return [index]
            found = True
            with unset_fake_temporarily():
                positions = value.nonzero().unbind(1)
            return [self.fake_mode.from_tensor(c) for c in positions]

        out = [[i for index in a for i in expand(index)] if isinstance(a, (list, tuple)) else a for a in args]
        return out if found else None

    def _small_integers(self, tensors: list[torch.Tensor]) -> bool:
        return all(not t.is_floating_point() and not t.is_complex() and t.numel() <= self.max_numel for t in tensors)


def _tensors(items):
    """The tensors among `items` and inside its lists and tuples (aten arguments nest one level at most)."""
    for a in items:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))
