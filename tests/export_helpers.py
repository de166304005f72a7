"""The tiny trained checkpoint the export tests share (the `tiny_checkpoint` fixture in conftest.py builds it
once per session), and readers for the GGUF files they write."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from felix.checkpoint import save_checkpoint
from felix.config import config_from_dict
from felix.corpus import stdlib_files
from felix.export_gguf import export_gguf
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.tokenizer import FelixTokenizer, train_tokenizer

# Every matrix dimension a multiple of 32 (q8_0/q4_0/rq4 blocks); GQA (4 heads, 2 kv heads);
# SpliceCore on layer 1. init_std 0.1 and a short training run give peaked next-token
# distributions, so greedy decoding compares decisions rather than near-ties.
TINY = {"vocab_size": 400, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
        "max_seq_len": 128, "splice_every": 2, "splice_rank": 4, "init_std": 0.1}
PROMPTS = ["def main(args):\n    return", "The quick brown fox", "import os\nimport sys\n\nclass",
           "    # Return the value of the"]
SAMPLE_TEXTS = [
    "Hello, world! It's 2024 and we're testing tokenizers.",
    "def f(x):\n\treturn x ** 2  # square\n\n\n    indented   spaces   ",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🎉🚀, math ∑∫√.",
    "tabs\tand\nnewlines\r\nand   multiple    spaces  ",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "<|user|> literal markers stay text <|endoftext|>",
]


@dataclass(frozen=True)
class TinyCheckpoint:
    root: Path
    path: Path  # the step-N directory
    tokenizer_path: Path

    def model(self) -> FelixLM:
        return load_model(self.path)[0]

    @property
    def tokenizer(self) -> FelixTokenizer:
        return FelixTokenizer.load(self.tokenizer_path)


def corpus_texts(limit: int = 50_000) -> list[str]:
    texts, total = [], 0
    for path in stdlib_files(7):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if 1_000 < len(text) < 8_000:
            texts.append(text)
            total += len(text)
        if total > limit:
            break
    return texts


def build_tiny_checkpoint(root: Path) -> TinyCheckpoint:
    """A briefly trained tiny FelixLM with a nonzero SpliceCore (gate 0.75), saved as a checkpoint in `root`."""
    texts = corpus_texts()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = train_tokenizer([root / "corpus.jsonl"], 400, root / "tokenizer.json")
    cfg = config_from_dict({"model": TINY, "train": {"seq_len": 128}})
    torch.manual_seed(0)
    model = FelixLM(cfg.model)
    ids = torch.tensor([i for t in tok.encode_batch(texts) for i in [*t, tok.eot_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for core in model.splice_cores().values():
            core.b.normal_(std=0.3, generator=gen)
            core.gate.fill_(0.75)
    path = save_checkpoint(root / "run", 60, model, cfg, {}, tokenizer_path=root / "tokenizer.json")
    return TinyCheckpoint(root, path, root / "tokenizer.json")


def gguf_field(reader, key):
    """A GGUF metadata value as Python: str, number, or list."""
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def gguf_tensors(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """name -> (ggml type, dequantized float32 array in numpy (rows, cols) order)."""
    reader = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
        tuple(reversed(t.shape.tolist())))) for t in reader.tensors}


def export_cached(ckpt: TinyCheckpoint, name: str, dtype: str, adapter: bool = False) -> tuple[Path, Path | None]:
    """The checkpoint exported as `name` (and its adapter): written once, beside the checkpoint, for every test."""
    out = ckpt.root / f"{name}.gguf"
    adapter_path = ckpt.root / f"{name}-lora.gguf" if adapter else None
    if not out.exists():
        export_gguf(ckpt.path, out, dtype, adapter_path)
    return out, adapter_path
