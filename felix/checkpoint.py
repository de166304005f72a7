"""Training checkpoints: safetensors weights and optimizer state plus a JSON trainer state.

Layout: `DIR/checkpoints/step-00001000/{model.safetensors, optimizer.safetensors, rng.safetensors,
trainer.json}`. Each checkpoint directory is written whole into a temp dir and renamed, so a crash
leaves either the previous checkpoint or the new one, never a half-written one. Nothing is pickled.
One found damaged anyway (a disk error, a file truncated by hand) is renamed `step-N.corrupt`, out of the listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from felix.atomic import atomic_dir, restore_moved_aside
from felix.config import FelixConfig, config_from_dict
from felix.errors import FelixError
from felix.patch_format import SPLICES_DIR, STACK_FILE

STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
# what a checkpoint holds besides its tensors' bytes, at most: safetensors headers (a name and a shape per tensor),
# trainer.json (the config and the loader's position) and the RNG state
_OVERHEAD_BYTES = 256 * 1024
_HEADER_BYTES_PER_TENSOR = 128


class CorruptCheckpoint(FelixError):
    """A checkpoint's files cannot be read back (truncated, missing, not JSON): the checkpoint is damaged,
    unlike one that reads but does not fit the run (another model config or tokenizer)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, config and (for training checkpoints) the rest of the state."""

    path: Path
    config: FelixConfig
    model_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]

    @property
    def quant_format(self) -> str | None:
        """The format of a `felix quantize` artifact (it loads dequantized); None for a training checkpoint."""
        return (self.trainer_state.get("quantized") or {}).get("quant_format")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as stored (row-major), for hashing."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """blake2b-256 of tensors themselves (names, dtypes, shapes and bytes, in name order): what stored tensors are
    checked against to find damaged ones (a quantized artifact's; a stored splice fold's is computed the same way)."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written: `checkpoints/step-N`, N zero-padded so names sort by step."""
    return checkpoint_dir(run_dir) / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer.json").is_file()]


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete the temp directories of checkpoint writes that a crash interrupted, after putting back a
    checkpoint a crash left moved aside (`atomic_dir` replacing an existing step directory). Only for the holder
    of the run directory's lock (`felix.run_lock`): another process's writes in flight look the same."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if (m := re.fullmatch(r"\.(step-\d+)\.\w{8}\.old", p.name)) is not None:
            restore_moved_aside(root / m.group(1), min_age=0)  # the lock holder is the only writer
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(".step-"):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(path: Path) -> int:
    """The step of checkpoint directory `step-N`."""
    return int(path.name.removeprefix("step-"))


def milestones(ckpts: list[Path], keep_every: int) -> set[Path]:
    """The checkpoints `train.keep_every` keeps for good: the first at or after each multiple of it (the multiple
    itself, always due, unless the run was not healthy then and its save was put off). `ckpts` oldest first."""
    if not keep_every:
        return set()
    kept, bucket = set(), 0
    for p in ckpts:
        if (b := step_of(p) // keep_every) > bucket:
            kept.add(p)
            bucket = b
    return kept


def holds_patches(path: Path) -> bool:
    """Whether checkpoint `path` has live edits beside it: a patch stack (`felix splice apply`, a server's pushes)
    with patches, or one that cannot be read (kept rather than lost)."""
    stack = path / SPLICES_DIR / STACK_FILE
    try:
        patches = json.loads(stack.read_text(encoding="utf-8")).get("patches")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True
    return patches != []  # an empty list alone says "no patches"; null, {} or no key is a stack felix cannot read


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int = 0, protect: tuple[int, ...] = ()) -> list[Path]:
    """Delete all checkpoints but the newest `keep_last`, the `milestones`, those of the steps in `protect` (a
    rollback target) and those with edits beside them (`holds_patches`: a resumed run pruned a spliced checkpoint,
    its patch stack with it); returns the deleted ones."""
    ckpts = list_checkpoints(run_dir)
    kept = set(ckpts[-keep_last:]) | milestones(ckpts, keep_every) | {p for p in ckpts if step_of(p) in protect}
    kept |= {p for p in ckpts if p not in kept and holds_patches(p)}
    doomed = [p for p in ckpts if p not in kept]
    for p in doomed:
        remove_checkpoint(p)
    return doomed


def set_aside_corrupt(path: Path) -> Path:
    """Rename a damaged checkpoint to `step-N.corrupt` (`.corrupt-2`, ... if taken): out of the listing, so
    neither a resume nor pruning reads it, yet kept for a look. Returns the new path."""
    for n in range(1, 1000):
        aside = path.with_name(f"{path.name}.corrupt" + (f"-{n}" if n > 1 else ""))
        if not os.path.lexists(aside):
            os.replace(path, aside)
            return aside
    raise FelixError(f"{path}: too many earlier {path.name}.corrupt* directories beside it; delete them")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a run dir (its latest checkpoint) or a model.safetensors file."""
    path = Path(path)
    if path.is_file() and path.name == "model.safetensors":
        path = path.parent
    if (path / "model.safetensors").is_file():
        return path
    if (latest := latest_checkpoint(path)) is not None:
        return latest
    if (path / "manifest.json").is_file():  # loaders that take artifacts check for one before calling this
        raise FelixError(f"{path} is a `felix quantize` artifact, not a training checkpoint: quantize or train "
                         f"from the checkpoint it was made from")
    raise FelixError(f"no checkpoint found at {path} (expected a run dir or a step-N dir with model.safetensors)")


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            out[f"{name}.{key}"] = value.detach().contiguous().cpu() if torch.is_tensor(value) else torch.tensor(value)
    return out


def checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                       ) -> list[torch.Tensor]:
    """The tensors a checkpoint of `model` and `optimizer` saves, or stand-ins of their shape and dtype: for a
    parameter the optimizer has not stepped yet, AdamW's two moments (like the parameter) and its fp32 step
    count. Meta tensors do: sizes are all that is read."""
    tensors = list(model.state_dict().values())
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                step = torch.zeros((), device=p.device)
                state = optimizer.state.get(p) or {"exp_avg": p, "exp_avg_sq": p, "step": step}
                tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     tokenizer_path: Path | None = None) -> int:
    """The size of a checkpoint of `model` and `optimizer` on disk, before it is written: its tensors' bytes
    exactly (`checkpoint_tensors`), plus the copied tokenizer and a bound on headers and trainer.json. The most
    a checkpoint of the run takes."""
    tensors = checkpoint_tensors(model, optimizer)
    total = sum(t.numel() * t.element_size() + _HEADER_BYTES_PER_TENSOR for t in tensors) + _OVERHEAD_BYTES
    if tokenizer_path is not None:
        total += os.path.getsize(tokenizer_path)
    return total


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    config: FelixConfig,
    trainer_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    keep_last: int | None = None,
    tokenizer_path: Path | None = None,
    keep_every: int = 0,
    protect: tuple[int, ...] = (),
) -> Path:
    """Write `step-N` atomically, then (with `keep_last`) `prune_checkpoints`.

    The tokenizer is copied in so a checkpoint directory is all that inference needs.
    """
    target = step_dir(run_dir, step)
    names = {id(p): n for n, p in model.named_parameters()}
    with atomic_dir(target) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "felix", "step": str(step)})
        if optimizer is not None:
            save_file(_optimizer_tensors(optimizer, names), str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # this process's device only: asking every GPU would open a context (memory) on each
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        doc = {"format_version": FORMAT_VERSION, "step": step, "config": config.model_dump(mode="json"),
               "trainer": trainer_state}
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        (tmp / "trainer.json").write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
    if keep_last:
        prune_checkpoints(run_dir, keep_last, keep_every, protect)
    return target


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so a kill midway never leaves a torn `step-N` that looks complete.

    The rename is atomic; what a kill leaves behind is a hidden `.step-N.pruned` that
    `remove_partial_checkpoints` clears on the next start.
    """
    doomed = path.with_name(f".{path.name}.pruned")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _load_tensors(path: Path, what: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file, with an error naming it when it is missing or damaged."""
    try:
        return load_file(str(path), device=device)
    except (OSError, SafetensorError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable {what} ({exc})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read weights, config and trainer state (not optimizer/RNG: see `restore_training_state`)."""
    path = resolve_checkpoint(path)
    meta_path = path / "trainer.json"
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
        config = config_from_dict(doc["config"], str(meta_path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: not a JSON object
        raise CorruptCheckpoint(f"{meta_path}: unreadable checkpoint metadata ({exc})") from None
    version = doc.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise FelixError(f"{meta_path}: checkpoint format {version} is newer than this felix reads ({FORMAT_VERSION})")
    weights = _load_tensors(path / "model.safetensors", "weights", device=str(map_location))
    return Checkpoint(path, config, weights, doc.get("trainer", {}))


def load_model_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Load weights with a clear error when their names or shapes disagree with the config."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.model_state))
    unexpected = sorted(set(ckpt.model_state) - set(expected))
    bad = [
        f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in ckpt.model_state.items() if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if bad:
            parts.append(f"shape mismatch {bad[:5]}")
        raise FelixError(f"{ckpt.path}: weights do not match the config: " + "; ".join(parts))
    model.load_state_dict(ckpt.model_state)


def restore_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load optimizer moments and RNG state written by `save_checkpoint`."""
    opt_path = path / "optimizer.safetensors"
    opt_tensors = _load_tensors(opt_path, "optimizer state")
    # Moments of another model (a file from another run) must not load: the fused kernel does not check
    # shapes and would step with them, reading or writing past the ends of the tensors.
    params = dict(model.named_parameters())
    bad = sorted(k for k, t in opt_tensors.items() if (p := params.get(k.rpartition(".")[0])) is None
                 or (not k.endswith(".step") and t.shape != p.shape))
    if bad:
        raise FelixError(f"{opt_path}: optimizer state does not fit the model (unknown names or other shapes: "
                         f"{bad[:5]}); is it from another run?")
    # AdamW keeps `step` on the parameter's device when fused, on the CPU otherwise.
    fused = bool(optimizer.defaults.get("fused"))
    for name, param in params.items():
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = opt_tensors.get(f"{name}.{key}")
            if t is not None:
                state[key] = t if key == "step" and not fused else t.to(param.device)
        if state:
            optimizer.state[param] = state
    rng_path = path / "rng.safetensors"
    rng = _load_tensors(rng_path, "RNG state")
    if "torch" not in rng:
        raise FelixError(f"{rng_path}: no torch RNG state in it")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and any(k.startswith("cuda") for k in rng):
        # `cudaN` keys: checkpoints that held every device's state
        state = rng.get("cuda", rng.get(f"cuda{torch.cuda.current_device()}"))
        if state is not None:
            torch.cuda.set_rng_state(state)
