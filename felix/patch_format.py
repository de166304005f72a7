"""The patch stack's files, read and written: the format `felix.patches.PatchStack` commits.

Layout beside the checkpoint (`CHECKPOINT_DIR/splices/`):

    stack.json                 {"format_version": 1, "base": DIGEST, "patches": [{"id", "file", "names", "record",
                               "absolute"}, ...]}
    <id>.<rev>.safetensors     "before/<name>" and "after/<name>" for each tensor the patch touches
    fold.safetensors           on a quantized artifact, the stack as served: the GPTQ folds of the last
                               stacks, "<i>.<name>", each under a digest of everything it reads
                               (`splice_fold.StackFold`)

A patch file is written whole under a fresh name, and stack.json replaced atomically after it (the commit
protocol is `PatchStack`'s). Reading checks every entry: file names stay inside the directory, each named
tensor has its before and after, of one shape.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from felix.atomic import atomic_path
from felix.errors import FelixError

SPLICES_DIR = "splices"
STACK_FILE = "stack.json"
FOLD_FILE = "fold.safetensors"
FORMAT_VERSION = 1
# methods whose patches set their tensors (stacks that predate the `absolute` field are read by these)
ABSOLUTE_METHODS = frozenset({"tensor_push", "gate_bias"})


@dataclass
class Patch:
    """One applied edit. `deltas` = after - before (float32) per SpliceCore tensor name."""

    id: str
    deltas: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]
    record: dict[str, Any]
    # The exact tensors written (model dtype); kept so restore/rollback never re-derive them by addition.
    after: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    file: str = field(default="", repr=False)
    # True: the patch set its tensors to `after`; False: it moved them by `deltas` (`felix.patches`)
    absolute: bool = False
    _entry: str | None = field(default=None, repr=False, compare=False)  # its stack.json entry, once made

    def entry_json(self) -> str:
        """Its entry in stack.json, as `json.dumps(indent=1, sort_keys=True)` writes it; made once (a patch's
        entry never changes, and the whole stack is written at every commit)."""
        if self._entry is None:
            self._entry = json.dumps({"id": self.id, "file": self.file, "names": self.names, "record": self.record,
                                      "absolute": self.absolute}, indent=1, sort_keys=True)
        return self._entry

    @property
    def names(self) -> list[str]:
        return sorted(self.before)


def writes_absolute(record: dict[str, Any]) -> bool:
    """Whether a patch with this record set its tensors (rather than moved them), judged by its method."""
    return record.get("method") in ABSOLUTE_METHODS


def stack_json(head: dict[str, Any], patches: list[Patch]) -> str:
    """`json.dumps({**head, "patches": entries}, indent=1, sort_keys=True)`, byte for byte, from the patches' kept
    entries: encoding a long stack anew at every commit took most of a write (64 ms at 1,000 patches)."""
    assert all(k < "patches" for k in head)  # sorted before it
    listed = "[]" if not patches else \
        "[\n" + ",\n".join("  " + p.entry_json().replace("\n", "\n  ") for p in patches) + "\n ]"
    return "{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in sorted(head.items())) \
        + f' "patches": {listed}\n}}'


def tensor_deltas(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """after - before per tensor, in float32: a patch's `deltas`."""
    return {k: after[k].float() - before[k].float() for k in before}


def parse_stack(stack_path: Path, raw: bytes) -> tuple[list[Patch], str | None]:
    """The patches stack.json's bytes `raw` name (their files read from beside it), and the stack's `base`
    digest; a FelixError naming the file for anything malformed or missing."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r} != {FORMAT_VERSION}")
        entries = doc["patches"]
        if not isinstance(entries, list):
            raise ValueError("'patches' is not a list")
        base = doc.get("base")
        if base is not None and not isinstance(base, str):
            raise ValueError("'base' is not a string")
        patches = [load_patch(stack_path.parent, e) for e in entries]
    except FelixError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FelixError(f"{stack_path}: corrupt patch stack ({exc})") from None
    ids = [p.id for p in patches]
    if len(set(ids)) != len(ids):
        raise FelixError(f"{stack_path}: corrupt patch stack (duplicate patch ids)")
    return patches, base

def load_patch(root: Path, entry: dict[str, Any]) -> Patch:
    """One stack.json entry's patch, its tensors read from its file in `root`."""
    pid, fname, names, record = entry["id"], entry["file"], entry["names"], entry["record"]
    if not isinstance(fname, str) or "/" in fname or "\\" in fname or not fname.endswith(".safetensors"):
        raise ValueError(f"bad patch file name {fname!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"patch {pid!r}: 'names' is not a list of tensor names")
    if not isinstance(record, dict):
        raise ValueError(f"patch {pid!r}: 'record' is not an object")
    path = root / fname
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise FelixError(f"{path}: unreadable patch file ({exc})") from None
    before = {n: tensors[f"before/{n}"] for n in names if f"before/{n}" in tensors}
    after = {n: tensors[f"after/{n}"] for n in names if f"after/{n}" in tensors}
    if len(before) != len(names) or len(after) != len(names):
        raise FelixError(f"{path}: patch file lacks tensors for {sorted(set(names) - (set(before) & set(after)))}")
    # a before/after pair of different shapes would fail later, as a traceback, in the deltas or a rollback
    if bad := [n for n in names if before[n].shape != after[n].shape]:
        raise FelixError(f"{path}: patch file's before and after tensors differ in shape for {bad}")
    absolute = entry.get("absolute")
    if absolute is None:  # written before the field existed: the method says
        absolute = writes_absolute(record)
    elif not isinstance(absolute, bool):
        raise ValueError(f"patch {pid!r}: 'absolute' is not true or false")
    return Patch(str(pid), tensor_deltas(before, after), before, dict(record), after, fname, absolute)


def write_patch_file(directory: Path, patch: Patch) -> None:
    """Write the patch's tensors into `directory` under a fresh file name, set as `patch.file` (a file an older
    stack.json names stays until the commit)."""
    patch.file = f"{patch.id}.{secrets.token_hex(4)}.safetensors"
    tensors = {f"before/{k}": v.contiguous() for k, v in patch.before.items()}
    tensors |= {f"after/{k}": v.contiguous() for k, v in patch.after.items()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / patch.file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "felix-patch", "id": patch.id})
    except OSError as exc:  # a full disk, a read-only checkpoint: nothing was committed
        raise FelixError(f"{directory}: cannot write patch {patch.id} ({exc})") from None
