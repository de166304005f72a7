"""Do a checkpoint's splice edits survive `felix export gguf`? Edit success and neutral locality read from the GGUF.

usage: python scripts/gguf_edit_survival.py CHECKPOINT EDITS.jsonl OUT.json [DTYPE ...]

CHECKPOINT carries a patch stack (`felix splice apply`); EDITS is the edit file those patches came from.
For each DTYPE (default q8_0 q4_0 rq4) the checkpoint is exported twice, merged and with `--splice-adapter`,
each file is read back (dequantized, q/k un-permuted, the adapter added as llama.cpp adds it at scale 1) into
a FelixLM, and its greedy outputs are compared with the edited model's as `load_model(..., splices=True)` gives
it (fp32, or a `felix quantize` artifact's grid): the targets of the edits that hold there, on their prompts,
and the neutral prompts' next tokens. The checkpoint without its patch stack, exported the same way, is the
control: how many neutral next tokens rounding alone moves (no control on an artifact: its edits are folded in).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from felix.export_gguf import RQ4_TYPE_ID, export_gguf, llama_unpermute
from felix.model_loader import load_model
from felix.quant_formats import get_format
from felix.splice_edit import load_requests
from felix.splice_examples import greedy_hits, make_example


class _Reader(gguf.GGUFReader):
    """GGUFReader keeping each tensor's (type, shape, offset): its own tensor table has no type 42 (rq4)."""

    def _build_tensors(self, start_offs, fields):
        self.raw = {}
        for field in fields:
            _, name, _, dims, dtype, offset = field.parts
            shape = tuple(reversed(dims.tolist()))
            self.raw[bytes(name).decode()] = (int(dtype[0]), shape, int(start_offs + offset[0]))
        self.tensors = []


def read_gguf(path: Path) -> dict[str, np.ndarray]:
    """name -> float32 array in (rows, cols) order, every ggml type dequantized."""
    reader = _Reader(path)
    out = {}
    for name, (ttype, shape, offset) in reader.raw.items():
        n = int(np.prod(shape))
        if ttype == RQ4_TYPE_ID:
            blocks = np.array(reader.data[offset: offset + n // 32 * 18])
            out[name] = get_format("rq4").dequantize(blocks, shape).numpy()
            continue
        qtype = gguf.GGMLQuantizationType(ttype)
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.array(reader.data[offset: offset + n // block * nbytes])
        if qtype == gguf.GGMLQuantizationType.F32:
            out[name] = raw.view(np.float32).reshape(shape)
        elif qtype == gguf.GGMLQuantizationType.F16:
            out[name] = raw.view(np.float16).astype(np.float32).reshape(shape)
        else:
            out[name] = np.asarray(gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype), np.float32).reshape(shape)
    return out


@torch.no_grad()
def load_into(model, base: dict[str, np.ndarray], adapter: dict[str, np.ndarray] | None) -> None:
    """Write a GGUF's tensors into `model` in place; SpliceCore off unless the adapter supplies it."""
    cfg = model.cfg

    def put(param: torch.Tensor, arr: np.ndarray) -> None:
        param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype))

    put(model.tok_emb.weight, base["token_embd.weight"])
    put(model.norm.weight, base["output_norm.weight"])
    for i, block in enumerate(model.layers):
        attn, mlp = block.attn, block.mlp
        put(block.attn_norm.weight, base[f"blk.{i}.attn_norm.weight"])
        put(attn.q_proj.weight, llama_unpermute(base[f"blk.{i}.attn_q.weight"], cfg.n_heads))
        put(attn.k_proj.weight, llama_unpermute(base[f"blk.{i}.attn_k.weight"], cfg.kv_heads))
        put(attn.v_proj.weight, base[f"blk.{i}.attn_v.weight"])
        put(attn.o_proj.weight, base[f"blk.{i}.attn_output.weight"])
        put(block.mlp_norm.weight, base[f"blk.{i}.ffn_norm.weight"])
        put(mlp.gate_proj.weight, base[f"blk.{i}.ffn_gate.weight"])
        put(mlp.up_proj.weight, base[f"blk.{i}.ffn_up.weight"])
        put(mlp.down_proj.weight, base[f"blk.{i}.ffn_down.weight"])
        if mlp.splice is not None:
            mlp.splice.gate.fill_(1.0)
            if adapter is None:
                mlp.splice.b.zero_()
            else:  # the adapter's B has the gate folded in; alpha = rank makes llama.cpp's scale 1
                put(mlp.splice.a, adapter[f"blk.{i}.ffn_down.weight.lora_a"])
                put(mlp.splice.b, adapter[f"blk.{i}.ffn_down.weight.lora_b"])


def rates(model, edits, neutral, neutral_next) -> dict[str, float]:
    """Share of `edits` whose target is still greedy, and of `neutral` prompts whose next token is unchanged."""
    ok = greedy_hits(model, edits)
    same = [g == n for g, n in zip(next_tokens(model, neutral), neutral_next, strict=True)]
    return {"success": sum(ok) / len(ok), "neutral_next_kept": sum(same) / len(same)}


@torch.no_grad()
def next_tokens(model, prompts: list[list[int]]) -> list[int]:
    """The greedy next token after each prompt."""
    return [int(model(torch.tensor([p]))[0, -1].argmax()) for p in prompts]


def main(ckpt: str, edits_path: str, out: str, dtypes: list[str]) -> None:
    edited, tok, _ = load_model(ckpt, splices=True)
    base, _, _ = load_model(ckpt, splices=False)
    requests = load_requests(edits_path)
    max_len = edited.cfg.max_seq_len
    examples = [make_example(tok, r.prompt, r.target, max_len) for r in requests]
    edits = [ex for ex, hit in zip(examples, greedy_hits(edited, examples), strict=True) if hit]
    neutral = [tok.encode(p) for p in dict.fromkeys(n for r in requests for n in r.neutral)]
    ref_next = next_tokens(edited, neutral)
    base_next = next_tokens(base, neutral)
    report = {"checkpoint": ckpt, "edits_holding": len(edits),
              "edit_requests": len(requests), "neutral_prompts": len(neutral), "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            row = {}
            for mode in ("merge", "adapter"):
                path, lora = Path(tmp) / f"m-{dtype}-{mode}.gguf", Path(tmp) / f"a-{dtype}.gguf"
                export_gguf(ckpt, path, dtype, lora if mode == "adapter" else None)
                load_into(base, read_gguf(path), read_gguf(lora) if mode == "adapter" else None)
                row[mode] = rates(base, edits, neutral, ref_next)
            row["adapter"]["adapter_file"] = "f32"
            row["base_rounding_neutral_next_kept"] = rates_base(ckpt, dtype, tmp, neutral, base_next)
            report["dtypes"][dtype] = row
            print(dtype, json.dumps(row), flush=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")


def rates_base(ckpt: str, dtype: str, tmp: str, neutral, base_next) -> float:
    """The unedited model exported at `dtype` (merged, SpliceCore as trained): neutral next tokens kept."""
    model, _, _ = load_model(ckpt, splices=False)
    stackless = Path(tmp) / "stackless"
    if not stackless.exists():
        stackless.mkdir()
        for f in Path(ckpt).iterdir():
            if f.name != "splices":
                (stackless / f.name).symlink_to(f.resolve())
    path = Path(tmp) / f"base-{dtype}.gguf"
    export_gguf(stackless, path, dtype, None)
    load_into(model, read_gguf(path), None)
    same = [g == n for g, n in zip(next_tokens(model, neutral), base_next, strict=True)]
    return sum(same) / len(same)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:] or ["q8_0", "q4_0", "rq4"])
