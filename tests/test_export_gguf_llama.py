"""`felix export gguf` (slow): the files run through llama.cpp itself via llama-cpp-python, compared with
PyTorch logit for logit, token for token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import PROMPTS, SAMPLE_TEXTS, corpus_texts, export_cached

from felix.generate import generate
from felix.model import FelixLM
from felix.tokenizer import FelixTokenizer


def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install felix-lm[llama])")
    from felix.local_teacher import disable_llama_extra_buffers

    disable_llama_extra_buffers()  # VMs that advertise AMX without supporting it die with SIGILL otherwise
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                           type_k=0, type_v=0, **kwargs)  # f32 KV cache: the comparison is with fp32 PyTorch


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@torch.no_grad()
def _torch_logits(model: FelixLM, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


def _compare(llm, model: FelixLM, tok: FelixTokenizer, atol: float) -> float:
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        diff = np.abs(_llama_logits(llm, ids) - _torch_logits(model, ids)).max()
        worst = max(worst, float(diff))
        assert diff <= atol, (prompt, diff)
        assert _llama_greedy(llm, ids, 24) == generate(model, ids, 24, greedy=True), prompt
    return worst


# Measured on the tiny model: f32 GGUF (f32 KV cache) vs PyTorch fp32, max |logit diff| ~3e-6.
LOGIT_ATOL = 1e-3


@pytest.mark.slow
def test_llama_cpp_f32_logits_and_greedy_match_pytorch(tiny_checkpoint):
    out, _ = export_cached(tiny_checkpoint, "merged-f32", "f32")
    worst = _compare(_llama(out), tiny_checkpoint.model(), tiny_checkpoint.tokenizer, LOGIT_ATOL)
    print(f"f32 GGUF vs PyTorch: max |logit diff| = {worst:.2e}")


def _set_lora_scale(llm, scale: float) -> None:
    """Change the loaded adapter's scale in place, as llama-server's POST /lora-adapters does.

    llama-cpp-python exposes this only through its low-level binding (and its private handles).
    """
    import ctypes

    import llama_cpp

    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale)) == 0


@pytest.mark.slow
def test_llama_cpp_splice_adapter_scale_is_the_gate(tiny_checkpoint):
    """Adapter scale 1 = the spliced model, 0 = the base model (SpliceCore zeroed), 0.5 = half the
    gate; the scale changes at runtime on the loaded model, without rebuilding or reloading."""
    out, adapter = export_cached(tiny_checkpoint, "base-f32", "f32", adapter=True)
    llm, tok = _llama(out, lora_path=str(adapter), lora_scale=1.0), tiny_checkpoint.tokenizer
    spliced = tiny_checkpoint.model()
    ids = tok.encode(PROMPTS[0])
    for scale in (1.0, 0.0, 0.5):
        model = tiny_checkpoint.model()
        for core in model.splice_cores().values():
            core.gate.fill_(0.75 * scale)
        if scale == 0.0:  # the splice must matter, or this test would prove nothing
            assert np.abs(_torch_logits(model, ids) - _torch_logits(spliced, ids)).max() > 0.1
        _set_lora_scale(llm, scale)
        worst = _compare(llm, model, tok, LOGIT_ATOL)
        print(f"adapter scale {scale}: max |logit diff| = {worst:.2e}")


# Mean KL(PyTorch || llama.cpp q8_0) per position; measured 2.1e-4 (max 9.2e-4) on the tiny model.
Q8_KL_MAX = 1e-3


@pytest.mark.slow
def test_llama_cpp_q8_0_within_kl(tiny_checkpoint):
    out, _ = export_cached(tiny_checkpoint, "merged-q8_0", "q8_0")
    llm, model, tok = _llama(out), tiny_checkpoint.model(), tiny_checkpoint.tokenizer
    kls = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        p = torch.log_softmax(torch.from_numpy(_torch_logits(model, ids)).double(), -1)
        q = torch.log_softmax(torch.from_numpy(_llama_logits(llm, ids)).double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
    kl = torch.cat(kls)
    print(f"q8_0 KL: mean {kl.mean():.2e}, max {kl.max():.2e}")
    assert kl.mean() <= Q8_KL_MAX


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_felix(tiny_checkpoint):
    out, _ = export_cached(tiny_checkpoint, "merged-f32", "f32")
    llm, tok = _llama(out, vocab_only=True), tiny_checkpoint.tokenizer
    for text in [*SAMPLE_TEXTS, *PROMPTS, *corpus_texts(20_000)[:3]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text[:60]
    chat = "<|system|>Be brief.<|end|><|user|>Hi there<|end|>\n<|assistant|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, allow_special=True)
    assert llm.token_eos() == tok.eot_id
    # llama-cpp-python renders the GGUF's chat template (its chat completions use it) as felix serve does
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|endoftext|>", "<|endoftext|>")
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = fmt(messages=messages).prompt
    assert prompt == "<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>"
    sp = tok.special_ids
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == [
        sp["<|system|>"], *tok.encode("Be brief."), sp["<|end|>"], sp["<|user|>"], *tok.encode("Hi there"),
        sp["<|end|>"], sp["<|assistant|>"]]
