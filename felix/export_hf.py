"""FelixLM -> a HF transformers model directory (`LlamaForCausalLM` + a fast tokenizer).

The weights come from `felix.hf_convert.to_hf_state_dict` (SpliceCores merged into down_proj) and
the config from `hf_llama_config`, so this directory and `to_hf_model` are the same model. The
tokenizer is the checkpoint's own tokenizer.json, loaded by `AutoTokenizer` as a
`PreTrainedTokenizerFast`: that class uses the file as it is, whereas the Llama tokenizer classes
would rebuild a SentencePiece-style pre-tokenizer that does not match our byte-level BPE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from felix.atomic import atomic_dir, check_apart, check_output
from felix.errors import FelixError
from felix.export_gguf import CHAT_TEMPLATE
from felix.hf_convert import hf_llama_config, to_hf_state_dict
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.quantize import check_finite
from felix.splice_fold import restore_served
from felix.tokenizer import EOT, PAD, SPECIAL_TOKENS

if TYPE_CHECKING:
    from transformers import LlamaConfig

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


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


def is_hf_export(path: Path) -> bool:
    """True for a directory `export_hf` wrote (its config.json names LlamaForCausalLM)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("architectures") == ["LlamaForCausalLM"]


def export_hf(checkpoint: str | Path, out: str | Path) -> dict:
    """Write `out/` (replacing it whole, atomically) and return a report of its files and sizes."""
    out = check_output(out, directory=True, make_parents=False)
    if out.exists() and not (out.is_dir() and (is_hf_export(out) or not any(out.iterdir()))):
        raise FelixError(f"output {out} exists and is not an empty directory or an earlier HF export; "
                         "refusing to replace it")
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
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_json(hf_cfg, cfg.rope_theta), indent=2, sort_keys=True),
                                         encoding="utf-8")
        (tmp / "generation_config.json").write_text(gen.to_json_string(use_diff=True), encoding="utf-8")
        shutil.copyfile(tok.path, tmp / "tokenizer.json")
        tok_cfg = tokenizer_config(cfg.max_seq_len)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
        special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    files = {name: (out / name).stat().st_size for name in FILES}
    return {"format": "hf", "checkpoint": str(ckpt.path), "out": str(out), "files": files,
            "bytes": sum(files.values()), "n_params": model.num_params(), "splice": "merged",
            "splice_patches": len(stack),
            "model": cfg.model_dump(mode="json")}
