"""Exports of shapes the main export tests do not cover (MHA, one KV head, d_ff off the quant block,
head_dim 24, rope_theta and norm_eps off their defaults, SpliceCore gates other than 1), run through
llama.cpp and transformers against FelixLM; and the HF files readable by transformers 4.x too."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from felix.checkpoint import save_checkpoint
from felix.config import config_from_dict
from felix.export_gguf import export_gguf
from felix.model import FelixLM
from felix.tokenizer import SPECIAL_TOKENS, FelixTokenizer, train_tokenizer

TEXT = ("def main(args):\n    return self.value + 1  # the quick brown fox jumps over the lazy dog\n"
        "import os\nimport sys\n\nclass Reader:\n    def read(self, path):\n        return open(path).read()\n")
BASE = {"vocab_size": 300, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 64,
        "splice_every": 1, "splice_rank": 4, "init_std": 0.1}
# three llama.cpp runs cover the five departures (each run loads three models: kept few for the suite's time)
SHAPES = {
    "mha": {},
    "one_kv_head_rope_and_eps": {"n_kv_heads": 1, "rope_theta": 500000.0, "norm_eps": 1e-6},
    "head_dim_24": {"d_model": 48, "n_heads": 2, "n_kv_heads": 1, "d_ff": 96},
}
D_FF_OFF_BLOCK = {"d_ff": 80}  # ffn_down rows of 80: not whole q8_0 blocks, so they stay f16
ROPE_AND_EPS = {"rope_theta": 500000.0, "norm_eps": 1e-6}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> FelixTokenizer:
    root = tmp_path_factory.mktemp("edge-tok")
    (root / "c.jsonl").write_text(json.dumps({"text": TEXT * 20}) + "\n", encoding="utf-8")
    return train_tokenizer([root / "c.jsonl"], 300, root / "tokenizer.json")


def _checkpoint(root: Path, tok: FelixTokenizer, gates: tuple[float, float] = (0.6, 2.0),
                **shape) -> tuple[Path, FelixLM]:
    """A random FelixLM (non-unit norms, live SpliceCores with the given gates) saved as a checkpoint."""
    cfg = config_from_dict({"model": BASE | shape, "train": {"seq_len": 64}})
    torch.manual_seed(0)
    model = FelixLM(cfg.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in (model.norm, *(n for b in model.layers for n in (b.attn_norm, b.mlp_norm))):
            norm.weight.uniform_(0.5, 1.5, generator=gen)
        for core, gate in zip(model.splice_cores().values(), gates, strict=True):
            core.b.normal_(std=0.3, generator=gen)
            core.gate.fill_(gate)
    path = save_checkpoint(root / "run", 1, model, cfg, {}, tokenizer_path=tok.path)
    return path, model.eval()


@torch.no_grad()
def _felix_logits(model: FelixLM, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from felix.local_teacher import disable_llama_extra_buffers

    disable_llama_extra_buffers()
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                           type_k=0, type_v=0, **kwargs)  # f32 KV cache: compared with fp32 PyTorch


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_llama_cpp_matches_felix_merged_and_as_adapter(shape, tokenizer, tmp_path):
    """f32 GGUF logits equal FelixLM's, SpliceCore merged and as an adapter at scale 1 (gates 0.6 and 2)."""
    path, model = _checkpoint(tmp_path, tokenizer, **SHAPES[shape])
    ids = tokenizer.encode(TEXT)[:48]
    want = _felix_logits(model, ids)
    export_gguf(path, tmp_path / "m.gguf", "f32")
    export_gguf(path, tmp_path / "base.gguf", "f32", tmp_path / "splice.gguf")
    merged = _llama_logits(_llama(tmp_path / "m.gguf"), ids)
    adapted = _llama_logits(_llama(tmp_path / "base.gguf", lora_path=str(tmp_path / "splice.gguf")), ids)
    assert np.abs(merged - want).max() < 1e-4 and np.abs(adapted - want).max() < 1e-4
    with torch.no_grad():  # the SpliceCores matter here, so the adapter run proves its scale and layout
        for core in model.splice_cores().values():
            core.gate.zero_()
    base = _llama_logits(_llama(tmp_path / "base.gguf"), ids)
    assert np.abs(base - _felix_logits(model, ids)).max() < 1e-4 and np.abs(base - want).max() > 0.1


@pytest.mark.slow
def test_llama_cpp_runs_q8_0_with_f16_fallback_rows(tokenizer, tmp_path):
    """d_ff 80: ffn_down rows are not whole blocks and stay f16; the mixed file runs close to FelixLM."""
    path, model = _checkpoint(tmp_path, tokenizer, **D_FF_OFF_BLOCK)
    export_gguf(path, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    ids = tokenizer.encode(TEXT)[:48]
    p = torch.log_softmax(torch.from_numpy(_felix_logits(model, ids)).double(), -1)
    q = torch.log_softmax(torch.from_numpy(_llama_logits(_llama(tmp_path / "m.gguf"), ids)).double(), -1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 2e-3


# -- HF export ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_rope_export(tokenizer, tmp_path_factory) -> tuple[Path, FelixLM]:
    pytest.importorskip("transformers")
    from felix.export_hf import export_hf

    root = tmp_path_factory.mktemp("edge-hf")
    path, model = _checkpoint(root, tokenizer, **ROPE_AND_EPS)
    export_hf(path, root / "hf")
    return root / "hf", model


def test_hf_config_names_rope_theta_where_transformers_4_reads_it(hf_rope_export):
    """transformers < 5 (which pyproject allows), vLLM and convert_hf_to_gguf read a top-level
    `rope_theta`; without it they run RoPE at 10000."""
    from transformers import AutoModelForCausalLM

    out, model = hf_rope_export
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-6
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(10, 60))])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)


def test_hf_tokenizer_config_special_tokens_load_in_transformers_4_and_5(hf_rope_export, tokenizer):
    """transformers 4.x reads `extra_special_tokens` as a {name: token} dict (a list raises
    AttributeError in AutoTokenizer); `additional_special_tokens` is read by 4.x and 5.x."""
    from transformers import AutoTokenizer

    out, _ = hf_rope_export
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert isinstance(config.get("extra_special_tokens", {}), dict)
    hf_tok = AutoTokenizer.from_pretrained(out)
    sp = tokenizer.special_ids
    assert set(hf_tok.all_special_tokens) == set(SPECIAL_TOKENS)
    ids = [sp["<|user|>"], *tokenizer.encode("hi"), sp["<|end|>"], sp["<|task:encoding|>"]]
    assert hf_tok.decode(ids, skip_special_tokens=True) == "hi"
