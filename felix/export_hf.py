"""FelixLM -> a HF transformers model directory (`LlamaForCausalLM` + a fast tokenizer).

The weights come from `felix.hf_convert.to_hf_state_dict` (SpliceCores merged into down_proj) and
the config from `hf_llama_config`, so this directory and `to_hf_model` are the same model. The
tokenizer is the checkpoint's own tokenizer.json, loaded by `AutoTokenizer` as a
`PreTrainedTokenizerFast`: that class uses the file as it is, whereas the Llama tokenizer classes
would rebuild a SentencePiece-style pre-tokenizer that does not match our byte-level BPE.

`felix_export.json` lists the files the export wrote: only a directory holding it (or an export from before
it, known by felix's chat template) is replaced, and a re-export keeps the files a user added there (a model
card, a license), since the usual next step is uploading the directory with them; the listed ones are felix's
and rewritten. Any other existing directory that is not empty is refused: it may be a model the user downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from felix.atomic import atomic_dir, check_apart, check_output
from felix.errors import FelixError
from felix.export_gguf import CHAT_TEMPLATE
from felix.hf_convert import hf_llama_config, to_hf_state_dict
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.quant_artifact import manifest_doc
from felix.quantize import check_finite
from felix.splice_fold import restore_served
from felix.tokenizer import EOT, PAD, SPECIAL_TOKENS

if TYPE_CHECKING:
    from transformers import LlamaConfig

MANIFEST = "felix_export.json"
EXPORT_FORMAT = "felix-hf-export"
EXPORT_VERSION = 1
# what exports wrote before the manifest
LEGACY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
FILES = (*LEGACY_FILES, MANIFEST)


def tokenizer_config(max_len: int) -> dict:
    """tokenizer_config.json: special tokens and the chat template; no BOS/EOS added on encode."""
    extra = [t for t in SPECIAL_TOKENS if t not in (EOT, PAD)]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT, "eos_token": EOT, "pad_token": PAD, "unk_token": None,
        # transformers 5 reads this as its list `extra_special_tokens`; 4.x wants that key a dict, and a
        # list there makes its AutoTokenizer raise
        "additional_special_tokens": extra,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes losslessly; don't touch spaces
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }


def config_json(hf_cfg: LlamaConfig, rope_theta: float) -> dict:
    """config.json's content. transformers 5 writes RoPE only under `rope_parameters`; transformers 4.x,
    vLLM and llama.cpp's convert_hf_to_gguf.py read a top-level `rope_theta` and, missing, use 10000."""
    return json.loads(hf_cfg.to_json_string(use_diff=False)) | {"rope_theta": rope_theta}


def exported_files(path: Path) -> set[str] | None:
    """The names an earlier `export_hf` wrote into directory `path` (its manifest lists them), None when it is
    not one. An export from before the manifest is known by felix's chat template in tokenizer_config.json."""
    doc = manifest_doc(path, MANIFEST)[1]
    if isinstance(doc, dict) and doc.get("format") == EXPORT_FORMAT:
        files = doc.get("files")
        listed = isinstance(files, list) and all(isinstance(f, str) for f in files)
        return {*(files if listed else FILES), MANIFEST}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (isinstance(config, dict) and config.get("architectures") == ["LlamaForCausalLM"]
            and isinstance(tok_cfg, dict) and tok_cfg.get("chat_template") == CHAT_TEMPLATE):
        return set(LEGACY_FILES)
    return None


def kept_files(out: Path) -> list[str]:
    """What a re-export of `out` keeps: the names in it that the earlier export did not write. FelixError
    unless `out` is missing, an empty directory or an earlier export (`exported_files`)."""
    if not out.exists():
        return []
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    owned = exported_files(out) if names else set()
    if names is None or owned is None:
        raise FelixError(f"output {out} exists and is not an empty directory or an earlier felix HF export "
                         f"(no {MANIFEST}); refusing to replace it")
    return [n for n in names if n not in owned]


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link `src` to `dst`, copying it where the filesystem refuses the link."""
    # a link costs no disk or time for a large kept file (a GGUF); only our own files, so that everything in
    # the export stays ours to replace (a copy of another user's file is ours, with its mode)
    if os.stat(src, follow_symlinks=False).st_uid == os.geteuid():
        with contextlib.suppress(OSError):  # EXDEV, EPERM, EMLINK, a filesystem without hard links
            os.link(src, dst)  # never a symlink: _carry and copytree(symlinks=True) recreate those
            return
    shutil.copy2(src, dst, follow_symlinks=False)


def _carry(src: Path, dst: Path) -> None:
    """Carry `src` (a file, a directory tree or a symlink, as itself) to `dst`, files hard-linked."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def export_hf(checkpoint: str | Path, out: str | Path) -> dict:
    """Write `out/` (replacing it whole, atomically; files a user added to an earlier export are kept) and
    return a report of its files and sizes."""
    out = check_output(out, directory=True, make_parents=False)
    kept_files(out.resolve())  # refused before the work
    try:
        from transformers import GenerationConfig
    except ImportError:
        raise FelixError("felix export hf needs transformers: pip install transformers") from None
    model, tok, ckpt = load_model(checkpoint)
    check_apart(out, ckpt.path)
    stack = PatchStack.open(ckpt.path)
    restore_served(model, tok, ckpt, stack)  # the model as edited, and as an artifact serves its edits
    check_finite(model.state_dict(), str(ckpt.path), "export")
    cfg = model.cfg
    if tok.vocab_size > cfg.vocab_size:
        raise FelixError(f"{ckpt.path}: tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    hf_cfg = hf_llama_config(cfg)
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = tok.eot_id
    hf_cfg.pad_token_id = tok.pad_id
    hf_cfg.dtype = "float32"
    state = to_hf_state_dict(model)
    # Tied: lm_head is the embedding. safetensors refuses shared storage, and transformers re-ties
    # lm_head on load from tie_word_embeddings, as save_pretrained does.
    del state["lm_head.weight"]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    gen = GenerationConfig(bos_token_id=tok.eot_id, eos_token_id=[tok.eot_id, tok.special_ids["<|end|>"]],
                           pad_token_id=tok.pad_id)
    manifest = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "files": list(FILES),
                "checkpoint": str(ckpt.path), "splice_patches": len(stack)}
    # resolved, as `felix quantize` writes its artifact: `--out .` has a name to put the temp dir beside, and
    # a symlink is written through (not replaced by a directory, its target left stale)
    target = out.resolve()
    try:
        kept: list[str] = []  # their modes are left alone (a hard link shares the user's file's mode)
        with atomic_dir(target, keep=kept) as tmp:
            kept += kept_files(target)  # again: what is there now is what the new directory keeps
            for name in kept:
                _carry(target / name, tmp / name)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config_json(hf_cfg, cfg.rope_theta), indent=2,
                                                        sort_keys=True), encoding="utf-8")
            (tmp / "generation_config.json").write_text(gen.to_json_string(use_diff=True), encoding="utf-8")
            shutil.copyfile(tok.path, tmp / "tokenizer.json")
            tok_cfg = tokenizer_config(cfg.max_seq_len)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
            special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}
            (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
            (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    # safetensors reports a failed write (a full disk) as its own error, not an OSError
    except (OSError, SafetensorError) as exc:  # atomic_dir left nothing behind, the old export in place
        raise FelixError(f"output {out}: cannot write the export ({exc})") from None
    files = {name: (target / name).stat().st_size for name in FILES}
    return {"format": "hf", "checkpoint": str(ckpt.path), "out": str(out), "files": files,
            "bytes": sum(files.values()), "kept": kept, "n_params": model.num_params(), "splice": "merged",
            "splice_patches": len(stack),
            "model": cfg.model_dump(mode="json")}
