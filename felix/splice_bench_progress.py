"""A sequential-edit bench's progress on disk, so that a stopped bench continues where it stopped.

After each step the bench writes one safetensors file: the SpliceCore state it holds (and the state it serves,
on a quantized artifact), with its bookkeeping as JSON in the metadata (the per-step rows, the edits applied,
where each neutral prompt first changed, the held-out NLLs). One file, renamed into place, so a stop at any
moment leaves the last finished step whole.

What the bench measures against (its step-0 greedy continuations, logprobs, attribution scores, NLLs) is not
stored: a resumed bench recomputes it from the same checkpoint, as the first run did. The file records what
the run was made of (`bench_identity`); a resume with anything else is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from felix.atomic import atomic_path
from felix.checkpoint import tensors_digest
from felix.errors import FelixError
from felix.splice_config import EditConfig

PROGRESS_FILE = "bench-progress.safetensors"
_FORMAT = "felix-bench-progress"


@dataclass
class BenchProgress:
    """Where a bench stood after its last finished step."""

    step: int  # steps done
    applied: list[int]  # indices of the requests applied
    suite: list[list[int]]  # the shown neutral prompts of the edits applied so far (token ids)
    steps: list[dict[str, Any]]  # the per-step rows
    first_break: dict[int, dict]  # neutral prompt -> the step its continuation first changed
    first_break_next: dict[int, dict]  # ... and its next token
    nll: float  # held-out NLL as served
    own_nll: float  # held-out NLL of the unrounded stack
    seconds: float  # spent on steps so far, over every run
    own: dict[str, torch.Tensor]  # the model's SpliceCore state
    served: dict[str, torch.Tensor] | None  # the state served (None: the model serves its own)


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def bench_identity(model, requests: list, cfg: EditConfig, **settings: Any) -> dict[str, Any]:
    """What a bench's figures depend on: the model's weights, the edit requests, the edit config and every other
    setting passed (`settings`: JSON-able values; tensors and lists of token ids are digested)."""
    out: dict[str, Any] = {"weights": tensors_digest(dict(model.state_dict())),
                           "requests": _digest([r.to_dict() for r in requests]), "n": len(requests),
                           "config": json.loads(json.dumps(asdict(cfg), default=str))}
    for key, value in settings.items():
        if isinstance(value, torch.Tensor):
            value = tensors_digest({key: value})
        elif isinstance(value, (list, tuple)) and len(value) > 8:
            value = _digest(value)
        out[key] = json.loads(json.dumps(value, default=str))
    return out


def save_progress(path: Path, identity: dict[str, Any], progress: BenchProgress) -> None:
    """Write `progress` to `path` whole or not at all."""
    tensors = {f"own/{k}": v.detach().contiguous() for k, v in progress.own.items()}
    tensors |= {f"served/{k}": v.detach().contiguous() for k, v in (progress.served or {}).items()}
    meta = {k: v for k, v in progress.__dict__.items() if k not in ("own", "served")}
    meta["served"] = progress.served is not None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "identity": json.dumps(identity),
                                               "progress": json.dumps(meta, default=str)})


def load_progress(path: Path, identity: dict[str, Any]) -> BenchProgress:
    """The progress in `path`; a FelixError when it is unreadable or was made of other inputs than `identity`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    except FileNotFoundError:
        raise FelixError(f"{path}: no unfinished bench here to resume") from None
    except (SafetensorError, OSError) as exc:
        raise FelixError(f"{path}: not a readable bench progress file ({exc})") from None
    if meta.get("format") != _FORMAT:
        raise FelixError(f"{path}: not a bench progress file (format {meta.get('format')!r})")
    try:
        stored, state = json.loads(meta["identity"]), json.loads(meta["progress"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FelixError(f"{path}: damaged bench progress metadata ({exc})") from None
    stored.setdefault("device", "cpu")  # written before `felix splice --device`, when every bench ran on the CPU
    differ = sorted(k for k in stored.keys() | identity.keys() if stored.get(k) != identity.get(k))
    if differ:
        detail = "; ".join(_difference(k, stored.get(k), identity.get(k)) for k in differ)
        raise FelixError(f"{path}: this bench was started with other inputs ({detail}); resume it with the same "
                         "checkpoint, edits and options, or start it again in another --out")
    served = {k[len("served/"):]: v for k, v in tensors.items() if k.startswith("served/")}
    return BenchProgress(
        step=state["step"], applied=state["applied"], suite=state["suite"], steps=state["steps"],
        first_break={int(k): v for k, v in state["first_break"].items()},
        first_break_next={int(k): v for k, v in state["first_break_next"].items()},
        nll=state["nll"], own_nll=state["own_nll"], seconds=state["seconds"],
        own={k[len("own/"):]: v for k, v in tensors.items() if k.startswith("own/")},
        served=served if state["served"] else None)


def _difference(key: str, was: Any, now: Any) -> str:
    if isinstance(was, dict) and isinstance(now, dict):
        fields = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
        return "; ".join(f"{key}.{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in fields)
    if key in ("weights", "requests") or (isinstance(was, str) and len(was) == 32):
        return f"{key} differ"
    return f"{key} was {was!r}, now {now!r}"
