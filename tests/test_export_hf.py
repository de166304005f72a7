"""`felix export hf`: the directory transformers loads with AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from felix.cli import main
from felix.errors import FelixError
from felix.export_hf import FILES, export_hf
from felix.generate import generate

pytest.importorskip("transformers")
from test_export_gguf import PROMPTS, SAMPLE_TEXTS, _texts, tiny_checkpoint  # noqa: E402,F401 (shared fixture)


@pytest.fixture(scope="module")
def hf_dir(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("hf") / "felix-tiny"
    report = export_hf(tiny_checkpoint.path, out)
    return out, report


def test_files_and_config(hf_dir):
    out, report = hf_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert report["files"] == {f: (out / f).stat().st_size for f in FILES}
    assert all((out / f).stat().st_mode & 0o044 for f in FILES)  # readable by the serving user
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2


def test_transformers_logits_match_felix(hf_dir, tiny_checkpoint):  # noqa: F811
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir[0], dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    model, tok = tiny_checkpoint.model(), tiny_checkpoint.tokenizer
    assert model.splice_cores()[1].b.abs().max() > 0  # the SpliceCore is live, so the merge matters
    stops = (tok.eot_id, tok.special_ids["<|end|>"])
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
            out = hf.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
            assert out[0, ids.shape[1]:].tolist() == generate(model, ids[0].tolist(), 16, greedy=True, stop_ids=stops)


def test_auto_tokenizer_encodes_like_felix(hf_dir, tiny_checkpoint):  # noqa: F811
    from transformers import AutoTokenizer

    hf_tok, tok = AutoTokenizer.from_pretrained(hf_dir[0]), tiny_checkpoint.tokenizer
    for text in [*SAMPLE_TEXTS[:-1], *PROMPTS, *_texts(20_000)[:3]]:
        assert hf_tok.encode(text) == tok.encode(text), text[:60]
        assert hf_tok.decode(tok.encode(text)) == text
    # transformers matches special tokens in text, as FelixTokenizer does with allow_special
    assert hf_tok.encode(SAMPLE_TEXTS[-1]) == tok.encode(SAMPLE_TEXTS[-1], allow_special=True)
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>"
    sp = tok.special_ids  # the ids felix serve builds for the same messages (felix.server_api.chat_ids)
    assert hf_tok.encode(text) == [sp["<|system|>"], *tok.encode("Be brief."), sp["<|end|>"],
                                   sp["<|user|>"], *tok.encode("Hi there"), sp["<|end|>"], sp["<|assistant|>"]]


def test_cli_json_and_bad_output(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    assert main(["export", "hf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(tmp_path / "m"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bytes"] == sum((tmp_path / "m" / f).stat().st_size for f in FILES)
    assert set(report["deployment_memory"]["models"]) == {"felix-300m", "felix-500m", "this_model"}
    # SpliceCore is merged into the HF weights: the deployment has no adapter to count, nor to name
    mem = report["deployment_memory"]
    assert {r["adapter_bytes"] for rows in mem["models"].values() for r in rows.values()} == {0}
    assert "adapter" not in mem["assumes"]
    assert main(["export", "hf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(tmp_path / "m")]) == 0
    assert "deployment memory (weights + f16 KV cache at " in (out := capsys.readouterr().out)
    assert "adapter" not in out
    with pytest.raises(FelixError, match="directory .*missing does not exist"):
        export_hf(tiny_checkpoint.path, tmp_path / "missing" / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_output_holding_the_checkpoint_or_other_files_is_refused(tiny_checkpoint, tmp_path):  # noqa: F811
    run = tiny_checkpoint.path.parent
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(FelixError, match="not an empty directory or an earlier HF export"):
        export_hf(tiny_checkpoint.path, run)
    with pytest.raises(FelixError, match="sit inside the checkpoint"):
        export_hf(tiny_checkpoint.path, tiny_checkpoint.path / "hf")  # a new directory inside the checkpoint
    assert sorted(p.name for p in run.iterdir()) == before
    (tmp_path / "empty").mkdir()
    export_hf(tiny_checkpoint.path, tmp_path / "empty")  # an empty directory, then its own earlier export
    export_hf(tiny_checkpoint.path, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(FILES)
