"""The packed quantized artifact that `felix quantize` writes and `felix generate` loads.

Layout of `OUT/` (written whole into a temp dir and renamed, so it exists complete or not at all):
- `weights.safetensors`: one tensor per model tensor under its state-dict name; block-quantized
  tensors are 1-D uint8 holding exactly the format's bytes (blocks in row-major order), kept
  tensors are fp16/fp32. The file is 8 + header + the sum of the tensors' bytes.
- `manifest.json`: format, embedding policy, per-tensor shape/encoding/bytes and contents digest
  (`checkpoint.tensors_digest`, checked at load: a flipped bit is refused, not served; artifacts written
  before digests have none and load unchecked), the size report and the model config (as `trainer.json`
  holds it), plus where the weights came from.
- `tokenizer.json`: copied from the source checkpoint when it has one, so the directory is all that
  inference needs.
Loading dequantizes to an fp32 state dict and returns a `Checkpoint`, so `load_model` builds the
usual FelixLM from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from felix.atomic import atomic_dir
from felix.checkpoint import TOKENIZER_FILE, Checkpoint, holds_patches, tensors_digest
from felix.config import FelixConfig, config_from_dict
from felix.errors import FelixError
from felix.patch_format import SPLICES_DIR
from felix.quant_formats import FORMATS, QuantError
from felix.quantize import KEPT, PackedTensor, check_finite, unpack_state
from felix.run_lock import RunLock, lock_run_dir

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ARTIFACT_FORMAT = "felix-quant"
ARTIFACT_VERSION = 1


def manifest_doc(path: str | Path, name: str = MANIFEST) -> tuple[Path, object]:
    """(the manifest's path, its JSON; None when it is missing or does not parse) for a directory or its
    manifest file `name` (the HF export names its own: `felix.export_hf.MANIFEST`)."""
    path = Path(path)
    manifest = path if path.name == name else path / name
    if not manifest.is_file():
        return manifest, None
    try:
        return manifest, json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return manifest, None


def _is_intact_artifact(path: str | Path) -> bool:
    """True for a directory (or its manifest.json) whose manifest names it a `write_artifact` artifact."""
    doc = manifest_doc(path)[1]
    return isinstance(doc, dict) and doc.get("format") == ARTIFACT_FORMAT


def is_quant_artifact(path: str | Path) -> bool:
    """True for a directory (or its manifest.json) that `write_artifact` produced, damaged ones included.

    A manifest that does not parse (truncated) or is not a JSON object, beside weights.safetensors and with
    no model.safetensors, is a damaged artifact: loading it then names the manifest, where a training
    checkpoint's loader would say the directory is an artifact and send the user elsewhere."""
    manifest, doc = manifest_doc(path)
    if isinstance(doc, dict):
        return doc.get("format") == ARTIFACT_FORMAT
    return (manifest.is_file() and (manifest.parent / WEIGHTS).is_file()
            and not (manifest.parent / "model.safetensors").is_file())


def check_replaceable(out: str | Path) -> None:
    """FelixError unless `out` is free or an intact artifact (which is replaced whole; a damaged one is not),
    one without edits (its patch stack would go with it: the edited artifact the README has you make), and one
    no other process holds (a `felix serve` of it, a `felix splice` on it)."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and _is_intact_artifact(out)):
        raise FelixError(f"{out} exists and is not a felix quantized artifact directory; refusing to replace it")
    if out.is_dir() and holds_patches(out):
        raise FelixError(f"{out} holds splice edits ({out / SPLICES_DIR}/, `felix splice list --checkpoint {out}`), "
                         f"which replacing the artifact would delete; roll them back, or write another --out")
    if (held := _hold_stack(out)) is not None:
        held.release()


def _hold_stack(out: Path) -> RunLock | None:
    """Hold the patch-stack lock of the artifact at `out` (`felix.patches.lock_stack`'s), or raise FelixError naming
    the process that holds it: replaced under a `felix serve`, the files it serves would be gone and its next write
    would be saved beside other weights. None without splices/ (which every server of it makes, and a failed
    quantize must not leave in the old artifact) or where it cannot be written (served read-only, without the lock:
    `SpliceService.load`)."""
    splices = out / SPLICES_DIR
    if not splices.is_dir() or not os.access(splices, os.W_OK):
        return None
    return lock_run_dir(splices, "stop it before replacing the artifact, or write another --out",
                        label="felix quantize", what="the artifact at --out is in use: a `felix serve` of it or a "
                                                     "`felix splice` on it holds its patch stack")


def write_artifact(out: str | Path, packed: dict[str, PackedTensor], config: FelixConfig, report: dict,
                   tokenizer: Path | None = None, source: str | None = None) -> Path:
    """Write the artifact atomically; an existing non-artifact path is refused, never replaced, and so is an
    artifact another process holds (its patch stack's lock, held here until the new one is in place)."""
    out = Path(out)
    check_replaceable(out)
    with _hold_stack(out) or contextlib.nullcontext():
        check_replaceable(out)  # again: edits may have been saved between the first check and the lock
        _write(out, packed, config, report, tokenizer, source)
    return out


def _write(out: Path, packed: dict[str, PackedTensor], config: FelixConfig, report: dict, tokenizer: Path | None,
           source: str | None) -> None:
    tensors = {name: p.data.detach().cpu().contiguous() for name, p in packed.items()}
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "quant_format": report["format"],
        "embeddings": report.get("embeddings"),
        "source": source,
        "config": config.model_dump(mode="json"),
        "report": report,
        "tensors": {name: {"shape": list(p.shape), "encoding": p.encoding, "bytes": p.nbytes,
                           "blake2b": tensors_digest({name: tensors[name]})}
                    for name, p in packed.items()},
    }
    # resolved: `--out .` has no name to put the temp dir beside, and a symlink would be replaced by a
    # directory (its old target left stale, the link moved aside) instead of written through
    try:
        with atomic_dir(out.resolve()) as tmp:
            save_file(tensors, str(tmp / WEIGHTS),
                      metadata={"format": ARTIFACT_FORMAT, "quant_format": report["format"]})
            if tokenizer is not None:
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    # a parent that is a file, no permission, a full disk (safetensors reports its failed write as its own
    # error, not an OSError): atomic_dir left nothing behind
    except (OSError, SafetensorError) as exc:
        raise FelixError(f"{out}: cannot write the artifact ({exc})") from None


def read_artifact(path: str | Path) -> tuple[dict, dict[str, PackedTensor]]:
    """(manifest, packed tensors), every tensor checked against the manifest (encoding, dtype, bytes and, where
    recorded, its contents digest)."""
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FelixError(f"{path / MANIFEST}: unreadable manifest ({exc})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT
            or manifest.get("format_version") != ARTIFACT_VERSION):
        raise FelixError(f"{path / MANIFEST}: not a {ARTIFACT_FORMAT} v{ARTIFACT_VERSION} manifest")
    entries = manifest.get("tensors")
    if not isinstance(entries, dict) or not isinstance(manifest.get("config"), dict):
        raise FelixError(f"{path / MANIFEST}: malformed manifest: 'tensors' and 'config' must be JSON objects")
    quant_format = manifest.get("quant_format")  # loaders key on it (training refuses an artifact)
    if not isinstance(quant_format, str) or quant_format not in FORMATS:  # a list is unhashable: TypeError
        raise FelixError(f"{path / MANIFEST}: malformed manifest: unknown quant_format "
                         f"{manifest.get('quant_format')!r}")
    try:
        stored = load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise FelixError(f"{path / WEIGHTS}: unreadable weights ({exc})") from None
    if missing := sorted(set(entries) - set(stored)):
        raise FelixError(f"{path / WEIGHTS}: tensors listed in the manifest are missing: {missing}")
    packed = {}
    for name, entry in entries.items():
        try:
            enc, shape, nbytes = entry["encoding"], tuple(entry["shape"]), entry["bytes"]
            # int() would pass 128.7 or "128"; a negative pair would multiply to a valid count
            if not isinstance(enc, str) or not all(type(n) is int and n >= 0 for n in shape):
                raise ValueError(f"encoding {enc!r}, shape {entry['shape']!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise FelixError(f"{path / MANIFEST}: tensor {name}: malformed entry ({type(exc).__name__}: {exc}); "
                             "expected encoding, shape and bytes") from None
        data = stored[name]
        if enc not in FORMATS and enc not in KEPT:
            raise FelixError(f"{path / MANIFEST}: tensor {name}: unknown encoding {enc!r}")
        p = PackedTensor(shape, enc, data)
        numel = p.numel
        want_dtype = KEPT.get(enc, torch.uint8)
        try:
            want_bytes = FORMATS[enc].nbytes(numel) if enc in FORMATS else numel * data.element_size()
        except QuantError as exc:
            raise FelixError(f"{path / MANIFEST}: tensor {name}: shape {list(shape)}: {exc}") from None
        if data.dtype != want_dtype or p.nbytes != want_bytes or p.nbytes != nbytes:
            raise FelixError(f"{path / WEIGHTS}: tensor {name}: {data.dtype} of {p.nbytes} bytes does not match "
                             f"{enc} {list(shape)} ({want_bytes} bytes of {want_dtype})")
        # no digest: written before they were recorded, loaded as it always was
        if (digest := entry.get("blake2b")) is not None and tensors_digest({name: data}) != digest:
            raise FelixError(f"{path / WEIGHTS}: tensor {name}: contents do not match the digest recorded in "
                             f"{MANIFEST}; the artifact is damaged (quantize it again)")
        packed[name] = p
    return manifest, packed


def load_quant_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The artifact dequantized to an fp32 state dict, as a `Checkpoint` (`load_model` takes it from here)."""
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    manifest, packed = read_artifact(path)
    config = config_from_dict(manifest["config"], str(path / MANIFEST))
    state = unpack_state(packed)
    # quantize refuses NaN/inf, so a non-finite weight here is corrupt bytes (a scale's exponent all ones)
    check_finite(state, str(path / WEIGHTS), "load it")
    state = {k: v.to(map_location) for k, v in state.items()}
    info = {"quantized": {k: manifest.get(k) for k in ("quant_format", "embeddings", "source")}}
    return Checkpoint(path, config, state, info)
