"""The patch stack: every live edit of SpliceCore tensors as a reversible, persisted patch.

A patch is the set of SpliceCore tensors one edit wrote: the exact tensors before it, the tensors it
wrote, their difference (`deltas = after - before`) and an edit record (request, method, metrics,
time). Patches stack in the order they were applied.

The files beside the checkpoint (`CHECKPOINT_DIR/splices/`) are `felix.patch_format`'s. `stack.json` is the
commit point: patch files are written first (each atomically, under a fresh name), then `stack.json` is
replaced atomically, then files it no longer names are deleted. A crash leaves the old stack or the new one;
stray files are removed by the next commit, and so are temp files a hard kill left mid-write once they are an
hour old (younger ones may be another process's write in progress: a fold being stored by a reader). Never by
`open`: a reader (a `felix generate` beside a serving writer) would delete a writer's patch file between its
write and its commit.

One writer at a time: `apply` and `rollback` hold an exclusive flock on `splices/` from their check that
stack.json is still the one this object read to their commit, so a second writer (another process, or
another PatchStack of the same checkpoint) waits and is then refused, never interleaved (interleaved, each
deleted the other's patch file as a stray: a stack.json naming a missing file, or a lost patch). `open`
takes no lock; a writer's commit between its read of stack.json and of the patch files (which may then be
gone) makes it read again. A process that writes the stack holds `lock_stack` (`splices/.lock`,
felix.run_lock) from before it reads the stack until it is done: `felix serve` for its whole life,
`felix splice apply`/`rollback` (and `bench --keep-patches` on its stack) while they run; so a CLI write to
a served checkpoint is refused up front, naming the server, instead of leaving the server's stack stale
(`StackChanged` on its every write). Readers take neither lock.

A patch's writes are absolute or relative (`absolute` in stack.json). Absolute: it set its tensors to the
values it wrote, whatever they held before (a server's tensor push, `tensor_push`, and gate edit,
`gate_bias`: gate = 1 + bias). Relative: it moved them by its deltas (a fact edit: `kl_train`, the closed
forms), which were computed against the state below it. A stack written before the field existed says so by
its records' methods: `ABSOLUTE_METHODS` are absolute, every other method relative.

Rollback exactness:
- The top patch: its `before` tensors are written back, so the model is bit-for-bit what it was before
  the patch was applied.
- A patch below the top: for each tensor it touched, the later patches that touched the same tensor are
  replayed, in stack order, on top of the removed patch's `before`: an absolute patch sets the tensor to
  exactly the values it wrote (so rolling back a push under a later push of the same tensor leaves the
  later push, and a gate edit under a later one leaves the later gate); a relative one adds its deltas
  (float32 sums, so equal up to rounding to what applying them to that `before` gives), and elements the
  removed patch did not change keep its exact writes. The later patches' `before`/`after` (and so their
  deltas) are rewritten to that new history, so rolling them back afterwards is again exact with respect to
  the new stack, and the same before and after a reopen (the deltas are what the files give,
  `after - before`).
- `restore` writes each tensor's latest `after` exactly, so a restarted server holds bit-identical
  SpliceCore tensors.

Which model a stack belongs to: `base` is the digest of every weight outside SpliceCore (`weights_digest`) of
the model the first patch was applied to. The patches hold whole SpliceCore tensors computed on that model, so
`restore` refuses a model whose other weights differ (a stack copied beside another checkpoint of the same
shape, or beside this one trained further): it would replace that model's trained SpliceCore with another's.
SpliceCore itself may differ from the stack's base (a server re-quantizes it before restoring): that is only
logged. A stack written before the field existed is restored as before, unchecked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from felix.atomic import atomic_write_text
from felix.checkpoint import tensors_digest
from felix.errors import FelixError
from felix.patch_format import (
    FOLD_FILE,
    FORMAT_VERSION,
    SPLICES_DIR,
    STACK_FILE,
    Patch,
    parse_stack,
    stack_json,
    tensor_deltas,
    write_patch_file,
    writes_absolute,
)
from felix.run_lock import RunLock, lock_run_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: writers are not guarded
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# a temp file this old cannot be a write in progress (a patch or fold takes seconds): a hard kill's leftover
STALE_TMP_SECONDS = 3600.0
# reads of a stack that writers keep committing under `open`; each retry follows a commit
_OPEN_ATTEMPTS = 8
_UNREAD = object()


class StackChanged(FelixError):
    """stack.json is no longer the one this PatchStack read: another process wrote the patch stack."""

    def __init__(self, path: Path):
        super().__init__(f"{path} was changed by another process; reopen the patch stack")
        self.path = path


def lock_stack(checkpoint_dir: Path, label: str) -> RunLock:
    """Hold `checkpoint_dir`'s patch stack for writing (`splices/.lock`, made if need be) until released, or
    raise FelixError naming the process that holds it; `label` says what this process is, for that message."""
    return lock_run_dir(Path(checkpoint_dir) / SPLICES_DIR,
                        "if that is a `felix serve`, write through its API (/api/v1/splice/...) or stop it; "
                        "otherwise wait for it to finish",
                        label=label, what="another felix process holds this checkpoint's patch stack")


def weights_digest(model) -> str:
    """The digest of a model's weights outside SpliceCore: what identifies the model a patch stack was made on."""
    splice = model.splice_state().keys()
    return tensors_digest({n: p for n, p in model.named_parameters() if n not in splice})


class PatchStack:
    """The ordered patches of one checkpoint; methods are thread-safe with respect to each other.

    `apply`/`rollback` write the model they are given: callers that run inference concurrently must keep
    forward passes off it (the server applies them to a twin no completion reads, then serves a copy).
    """

    def __init__(self, checkpoint_dir: Path, patches: list[Patch], disk: bytes | None | object = _UNREAD,
                 base: str | None = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.dir = self.checkpoint_dir / SPLICES_DIR
        self._patches = patches
        # `weights_digest` of the model the patches were made on; None: no patch yet, or a stack older than it
        self.base = base
        self._lock = threading.RLock()
        # stack.json as this object last saw it (`open` passes the bytes it parsed: a second read could see
        # a newer stack than the patches, and a stale object would then pass `_check_disk`)
        self._disk = self._read_disk() if disk is _UNREAD else disk

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def open(cls, checkpoint_dir: Path) -> PatchStack:
        """Load `CHECKPOINT_DIR/splices/`; an empty stack when there is none."""
        stack_path = Path(checkpoint_dir) / SPLICES_DIR / STACK_FILE
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                raw = stack_path.read_bytes()
            except FileNotFoundError:
                return cls(checkpoint_dir, [], None)
            except OSError as exc:
                raise FelixError(f"{stack_path}: corrupt patch stack ({exc})") from None
            try:
                patches, base = parse_stack(stack_path, raw)
                return cls(checkpoint_dir, patches, raw, base)
            except FelixError:
                # a writer committed meanwhile and deleted the files of the stack we read: read it again
                with contextlib.suppress(OSError):
                    if stack_path.read_bytes() != raw and attempt + 1 < _OPEN_ATTEMPTS:
                        continue
                raise
        raise FelixError(f"{stack_path}: kept changing while it was read")  # not reached: the last try raises

    def _remove_stray_files(self) -> None:
        """Delete patch files that no committed stack names (left by a crash mid-write) and stale temp
        files. Best effort: a stray that cannot be deleted (a read-only checkpoint) costs disk only, while
        failing here would fail an apply whose stack.json is already committed."""
        keep = {p.file for p in self._patches} | {FOLD_FILE}
        strays = [f for f in self.dir.glob("*.safetensors") if f.name not in keep]
        now = time.time()
        for f in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):  # renamed or removed by its writer meanwhile
                if now - f.stat().st_mtime > STALE_TMP_SECONDS:
                    strays.append(f)
        for f in strays:
            try:
                f.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s: could not remove stray patch file (%s)", f, exc)

    def _read_disk(self) -> bytes | None:
        try:
            return (self.dir / STACK_FILE).read_bytes()
        except FileNotFoundError:
            return None

    def _check_disk(self) -> None:
        """Refuse to write over a stack another process changed since we read it (one writer at a time:
        stop `felix serve` before editing its checkpoint from the CLI, or edit through the server)."""
        if self._read_disk() != self._disk:
            raise StackChanged(self.dir / STACK_FILE)

    @contextlib.contextmanager
    def _writing(self, create: bool) -> Iterator[None]:
        """Hold this object and the store (an exclusive flock on `splices/`, waiting for another writer's
        commit) from `_check_disk` to the commit; `create` makes `splices/` first (an apply)."""
        with self._lock:
            fd = None
            try:
                try:
                    if create:
                        self.dir.mkdir(parents=True, exist_ok=True)
                    # absent (a rollback): nothing on disk to guard, `_check_disk` decides
                    if fcntl is not None and self.dir.is_dir():
                        fd = os.open(self.dir, os.O_RDONLY)
                        fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as exc:
                    raise FelixError(f"{self.dir}: cannot write the patch stack ({exc})") from None
                self._check_disk()
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # releases the flock

    # -- queries -------------------------------------------------------------------------------
    def list(self) -> list[Patch]:
        with self._lock:
            return list(self._patches)

    def top(self) -> Patch | None:
        with self._lock:
            return self._patches[-1] if self._patches else None

    def __len__(self) -> int:
        return len(self._patches)

    # -- edits ---------------------------------------------------------------------------------
    def apply(self, model, after: dict[str, torch.Tensor], record: dict[str, Any],
              absolute: bool | None = None) -> Patch:
        """Write `after` into the model's SpliceCore tensors and push the patch; persist it atomically.

        `absolute`: whether the patch sets its tensors (a rollback below it then keeps its values) or moves
        them (a rollback below it replays its deltas); default: by the record's method (`ABSOLUTE_METHODS`).
        Validation (names, shapes, finiteness) happens before anything is written; on any failure the
        model and the stack are unchanged and a FelixError says why.
        """
        if not after:
            raise FelixError("a patch must write at least one SpliceCore tensor")
        record = dict(record)
        absolute = writes_absolute(record) if absolute is None else bool(absolute)
        record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise FelixError(f"patch record is not JSON-serializable ({exc})") from None
        with self._writing(create=True):
            current = model.splice_state()
            before = {k: current[k].cpu() for k in after if k in current}
            try:
                model.load_splice_state({k: v.detach() for k, v in after.items()}, strict=False)
            except (KeyError, ValueError) as exc:
                raise FelixError(f"patch rejected: {exc.args[0] if exc.args else exc}") from None
            written = model.splice_state()
            after_exact = {k: written[k].cpu() for k in before}
            patch = Patch(self._new_id(), tensor_deltas(before, after_exact), before, record, after_exact,
                          absolute=absolute)
            try:
                write_patch_file(self.dir, patch)
                # the first patch names the model the stack belongs to (a stack older than the field: its next apply)
                self._commit([*self._patches, patch], self.base or weights_digest(model))
            except BaseException:
                model.load_splice_state(before, strict=False)  # the model must not hold an unsaved patch
                raise
            return patch

    def rollback(self, model, patch_id: str,
                 check: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
        """Remove a patch (see the module docstring for exactness); raises FelixError for unknown ids. `check`
        sees the tensors the rollback would write (those of the removed patch) before anything is committed,
        and refuses them by raising."""
        with self._writing(create=False):
            idx = next((i for i, p in enumerate(self._patches) if p.id == patch_id), None)
            if idx is None:
                raise FelixError(f"no patch {patch_id!r} in the stack at {self.dir}")
            removed = self._patches[idx]
            # Replay the later patches on top of the removed patch's `before`, in stack order: an absolute
            # patch's values, a relative patch's deltas.
            value = {k: v.clone() for k, v in removed.before.items()}
            later: list[Patch] = []
            for p in self._patches[idx + 1:]:
                shared = [k for k in p.before if k in value]
                if not shared:
                    later.append(p)
                    continue
                before = dict(p.before)
                after = dict(p.after)
                for k in shared:
                    if not p.absolute:
                        replayed = (value[k].float() + p.deltas[k]).to(p.after[k].dtype)
                        # where the history below p did not change (elements the removed patch left as they
                        # were), p's exact write stands: x + (y - x) is not always y in floating point
                        after[k] = torch.where(value[k] == p.before[k], p.after[k], replayed)
                    # an absolute patch's `after` stands as written: it set the tensor, whatever was below
                    before[k] = value[k]
                    value[k] = after[k]
                # deltas as a reopen computes them from the rewritten files, so that rolling back again
                # gives the same tensors before and after a restart
                q = Patch(p.id, tensor_deltas(before, after), before, p.record, after, absolute=p.absolute)
                write_patch_file(self.dir, q)
                later.append(q)
            new_stack = [*self._patches[:idx], *later]
            # Validate before persisting so a non-finite replay cannot be committed.
            for k, v in value.items():
                if not torch.isfinite(v).all():
                    raise FelixError(f"rollback of {patch_id} would leave non-finite values in {k}")
            if check is not None:
                check(value)
            # Write the model first (load_splice_state checks every name and shape before writing any): a
            # patch that does not fit the model must fail with the stack still holding it, not committed.
            current = model.splice_state()
            prior = {k: current[k] for k in value if k in current}
            try:
                model.load_splice_state(value, strict=False)
            except (KeyError, ValueError) as exc:
                raise FelixError(f"{self.dir / STACK_FILE}: cannot roll back {patch_id}, it does not fit this "
                                 f"model ({exc.args[0] if exc.args else exc})") from None
            try:
                self._commit(new_stack)
            except BaseException:
                model.load_splice_state(prior, strict=False)  # the model must match the stack on disk
                raise

    def restore(self, model) -> None:
        """Write the stack's state into a freshly loaded model (e.g. on server restart); a FelixError when the
        stack was made on another model (its weights outside SpliceCore differ: `base`)."""
        with self._lock:
            if self._patches and self.base is not None and weights_digest(model) != self.base:
                raise FelixError(f"{self.dir / STACK_FILE}: this patch stack was made on other weights than this "
                                 f"checkpoint's (another checkpoint, or this one trained further); its patches hold "
                                 f"SpliceCore tensors computed there and would replace this model's. Move {self.dir} "
                                 f"aside, and apply its edit requests here again (`felix splice list --json` of the "
                                 f"checkpoint it was made on gives them)")
            state: dict[str, torch.Tensor] = {}
            base: dict[str, torch.Tensor] = {}
            for p in self._patches:
                for k in p.before:
                    base.setdefault(k, p.before[k])
                state.update(p.after)
            if not state:
                return
            current = model.splice_state()
            changed = [k for k, v in base.items() if k in current and not torch.equal(current[k].cpu(), v)]
            if changed:
                # The checkpoint's SpliceCore differs from what the first patches saw (e.g. re-quantized
                # serving): the patches' latest tensors still win, but say so.
                log.warning("%s: SpliceCore tensors %s differ from the patch stack's base", self.dir, changed[:5])
            try:
                model.load_splice_state(state, strict=False)
            except (KeyError, ValueError) as exc:
                raise FelixError(f"{self.dir / STACK_FILE}: patch stack does not fit this model ({exc}); move "
                                 f"{self.dir} aside to use the checkpoint without its splices") from None

    # -- persistence ---------------------------------------------------------------------------
    def _new_id(self) -> str:
        seq = 1 + max((int(p.id[1:5]) for p in self._patches if p.id[1:5].isdigit()), default=0)
        return f"p{seq:04d}-{secrets.token_hex(3)}"

    def _commit(self, patches: list[Patch], base: str | None = None) -> None:
        """Atomically replace stack.json, then adopt the new list and drop unreferenced files. `base`: the
        stack's model (default: as it is; an empty stack belongs to no model)."""
        base = (base or self.base) if patches else None
        text = stack_json({"format_version": FORMAT_VERSION, **({"base": base} if base else {})}, patches)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / STACK_FILE, text)
        except OSError as exc:  # the old stack.json stands
            raise FelixError(f"{self.dir / STACK_FILE}: cannot save the patch stack ({exc})") from None
        self._disk = text.encode("utf-8")
        self._patches = patches
        self.base = base
        self._remove_stray_files()
