"""`felix export hf`: the directory transformers loads with AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from export_helpers import PROMPTS, SAMPLE_TEXTS, corpus_texts

from felix.cli import main
from felix.errors import FelixError
from felix.export_hf import FILES, LEGACY_FILES, MANIFEST, export_hf
from felix.generate import generate

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tiny_checkpoint, tmp_path_factory):
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
    assert json.loads((out / MANIFEST).read_text())["files"] == list(FILES)  # what a re-export replaces


def test_transformers_logits_match_felix(hf_dir, tiny_checkpoint):
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


def test_auto_tokenizer_encodes_like_felix(hf_dir, tiny_checkpoint):
    from transformers import AutoTokenizer

    hf_tok, tok = AutoTokenizer.from_pretrained(hf_dir[0]), tiny_checkpoint.tokenizer
    for text in [*SAMPLE_TEXTS[:-1], *PROMPTS, *corpus_texts(20_000)[:3]]:
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


def test_cli_json_and_bad_output(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", "hf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(tmp_path / "m"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bytes"] == sum((tmp_path / "m" / f).stat().st_size for f in FILES)
    # transformers' memory, not llama.cpp's: the weights as written (float32) or loaded in bfloat16, each with
    # the KV cache DynamicCache holds in that dtype at the model's max_seq_len by default
    mem = report["deployment_memory"]
    cfg = tiny_checkpoint.model().cfg
    assert mem["runtime"] == "transformers" and mem["context"] == cfg.max_seq_len == 128
    rows = mem["models"]["this_model"]
    assert set(rows) == {"float32", "bfloat16"} and "llama.cpp" not in json.dumps(mem)
    weights = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert rows["float32"]["weights_bytes"] <= weights <= rows["float32"]["weights_bytes"] + 16 * 1024  # + header
    assert rows["bfloat16"]["weights_bytes"] * 2 == rows["float32"]["weights_bytes"]
    # K and V, 2 layers x 2 kv heads x 16 dims x 128 positions x 4 bytes
    assert rows["float32"]["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 128 * 4 == 2 * rows["bfloat16"]["kv_cache_bytes"]
    assert main(["export", "hf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(tmp_path / "m"),
                 "--kv-context", "512"]) == 0
    captured = capsys.readouterr()
    assert "transformers memory (weights + its DynamicCache's KV cache at 512 positions" in captured.out
    assert "llama.cpp" not in captured.out and "adapter" not in captured.out
    assert "note: --kv-context 512 is past the model's max_seq_len 128" in captured.err
    assert "where transformers applies RoPE" in captured.err
    with pytest.raises(FelixError, match="directory .*missing does not exist"):
        export_hf(tiny_checkpoint.path, tmp_path / "missing" / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_output_holding_the_checkpoint_or_other_files_is_refused(tiny_checkpoint, tmp_path):
    run = tiny_checkpoint.path.parent
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(FelixError, match="not an empty directory or an earlier felix HF export"):
        export_hf(tiny_checkpoint.path, run)
    with pytest.raises(FelixError, match="sit inside the checkpoint"):
        export_hf(tiny_checkpoint.path, tiny_checkpoint.path / "hf")  # a new directory inside the checkpoint
    assert sorted(p.name for p in run.iterdir()) == before
    (tmp_path / "empty").mkdir()
    export_hf(tiny_checkpoint.path, tmp_path / "empty")  # an empty directory, then its own earlier export
    export_hf(tiny_checkpoint.path, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(FILES)


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every file under `root` by relative path: its bytes, or where a symlink points."""
    return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def test_a_downloaded_hf_llama_model_is_refused_not_replaced(tiny_checkpoint, hf_dir, tmp_path):
    """Before: any directory whose config.json named LlamaForCausalLM was taken for an earlier export and
    deleted (a user's SmolLM2 download: README, onnx/ and weights)."""
    download = tmp_path / "SmolLM2-135M"
    download.mkdir()
    (download / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (download / "README.md").write_text("# SmolLM2\n")
    (download / "onnx").mkdir()
    (download / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (download / "model.safetensors").write_bytes(b"weights")
    before = _tree(download)
    with pytest.raises(FelixError, match=f"SmolLM2-135M exists and is not an empty directory or an earlier felix "
                                         f"HF export \\(no {MANIFEST}\\)"):
        export_hf(tiny_checkpoint.path, download)
    # the same download holding felix's files (a hand-made copy) is still not felix's to replace
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copyfile(hf_dir[0] / name, download / name)
    before = _tree(download)
    with pytest.raises(FelixError, match="not an empty directory or an earlier felix HF export"):
        export_hf(tiny_checkpoint.path, download)
    assert _tree(download) == before and sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M"]


def test_a_re_export_keeps_the_files_a_user_added(tiny_checkpoint, tmp_path):
    """Before: a model card added to an earlier export was deleted by the next one."""
    out = tmp_path / "felix-hf"
    export_hf(tiny_checkpoint.path, out)
    (out / "README.md").write_text("---\nlicense: mit\n---\n# my model\n")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    (out / "card.md").symlink_to("README.md")
    ours = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(b"stale")  # felix's own files are rewritten
    report = export_hf(tiny_checkpoint.path, out)
    assert (out / "README.md").read_text().endswith("# my model\n") and (out / "eval" / "scores.json").is_file()
    assert report["kept"] == ["README.md", "card.md", "eval"]
    assert os.readlink(out / "card.md") == "README.md" and (out / "model.safetensors").read_bytes() == ours
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "README.md", "card.md", "eval"])
    assert [p.name for p in tmp_path.iterdir()] == ["felix-hf"]  # no temp or aside left


def test_a_re_export_links_the_kept_files_and_copies_where_linking_fails(tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    """Before: every kept file was copied, a large one (a GGUF) doubling disk use on each re-export."""
    out = tmp_path / "felix-hf"
    export_hf(tiny_checkpoint.path, out)
    (out / "model.gguf").write_bytes(b"gguf" * 1000)
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text('{"acc": 1}')
    inode = {name: (out / name).stat().st_ino for name in ("model.gguf", "eval/scores.json")}
    export_hf(tiny_checkpoint.path, out)
    assert {name: (out / name).stat().st_ino for name in inode} == inode  # the same file, not a copy
    assert (out / "model.gguf").read_bytes() == b"gguf" * 1000 and (out / "eval" / "scores.json").read_text() == (
        '{"acc": 1}')
    assert (out / "model.gguf").stat().st_nlink == 1  # the old export's link went with it
    # a filesystem refusing the link (EXDEV here, once): that file is copied, the rest still linked
    link, refused = os.link, []

    def link_once_refused(src, dst, **kwargs):
        if not refused:
            refused.append(Path(src).name)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link_once_refused)
    export_hf(tiny_checkpoint.path, out)
    assert refused == ["scores.json"]  # kept names in order: eval/ before model.gguf
    assert (out / "eval" / "scores.json").stat().st_ino != inode["eval/scores.json"]
    assert (out / "model.gguf").stat().st_ino == inode["model.gguf"]
    assert (out / "model.gguf").read_bytes() == b"gguf" * 1000 and (out / "eval" / "scores.json").read_text() == (
        '{"acc": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["felix-hf"]


def test_a_re_export_keeps_the_modes_of_the_directory_and_of_the_kept_files(tiny_checkpoint, tmp_path):
    """Before: a kept file (hard-linked, so the user's own file too) and a kept directory became 0644/0755."""
    out = tmp_path / "felix-hf"
    export_hf(tiny_checkpoint.path, out)
    (out / "hf_token").write_text("hf_xxx")
    (out / "private").mkdir()
    (out / "private" / "notes.md").write_text("notes")
    (out / "LICENSE").write_text("mit")
    modes = {"hf_token": 0o600, "private": 0o700, "private/notes.md": 0o600, "LICENSE": 0o444, ".": 0o700}
    for name, mode in modes.items():
        os.chmod(out / name, mode)
    export_hf(tiny_checkpoint.path, out)
    assert {name: (out / name).stat().st_mode & 0o777 for name in modes} == modes
    assert all((out / f).stat().st_mode & 0o044 for f in FILES)  # felix's own files are new: readable


def test_an_export_from_before_the_manifest_is_replaced(tiny_checkpoint, hf_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in LEGACY_FILES:
        shutil.copyfile(hf_dir[0] / name, old / name)
    (old / "README.md").write_text("card")
    export_hf(tiny_checkpoint.path, old)
    assert sorted(p.name for p in old.iterdir()) == sorted([*FILES, "README.md"])


def test_out_dot_is_the_directory_it_is_run_in(tiny_checkpoint, tmp_path, monkeypatch):
    """Before: `--out .` ran the whole export, then failed renaming onto '.'."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["export", "hf", "--checkpoint", str(tiny_checkpoint.path), "--out", ".", "--json"]) == 0
    assert sorted(p.name for p in work.iterdir()) == sorted(FILES) and [p.name for p in tmp_path.iterdir()] == [
        "work"]


def test_a_symlinked_out_is_written_through(tiny_checkpoint, tmp_path):
    """Before: the link was replaced by a directory, its target left stale."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "current").symlink_to("work")
    export_hf(tiny_checkpoint.path, tmp_path / "current")
    (work / "README.md").write_text("card")
    export_hf(tiny_checkpoint.path, tmp_path / "current")
    assert (tmp_path / "current").is_symlink() and (work / "README.md").read_text() == "card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "work"]


def test_a_full_disk_is_an_error_and_the_earlier_export_stays(tiny_checkpoint, hf_dir, tmp_path, capsys,
                                                             file_size_limit):
    """Before: safetensors' SafetensorError was a traceback (rc 1)."""
    out = tmp_path / "hf"
    shutil.copytree(hf_dir[0], out)
    before = _tree(out)
    with file_size_limit(4096):  # the weights are larger: their write fails midway, as on a full disk
        rc = main(["export", "hf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"felix export hf: error: output {out}: cannot write the export"), err
    assert "File too large" in err and _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["hf"]
