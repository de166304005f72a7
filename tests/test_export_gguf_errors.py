"""`felix export gguf` on bad input: unknown dtypes, outputs it must not replace, weights it cannot
encode, checkpoints that disagree with their config, and failures mid-write."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from export_helpers import gguf_tensors
from safetensors.torch import load_file, save_file

from felix.cli import main
from felix.errors import FelixError
from felix.export_gguf import export_gguf
from felix.tokenizer import SPECIAL_TOKENS, train_tokenizer


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_unknown_dtype_and_missing_directory_fail_cleanly(tiny_checkpoint, tmp_path):
    with pytest.raises(FelixError, match="unknown dtype 'q3_k'.*f32, f16, q8_0, q4_0, rq4"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "q3_k")
    with pytest.raises(FelixError, match="directory .*nowhere does not exist"):
        export_gguf(tiny_checkpoint.path, tmp_path / "nowhere" / "m.gguf", "f16")
    with pytest.raises(FelixError, match="adapter output .*does not exist"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16", tmp_path / "nowhere" / "a.gguf")
    assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []


def test_the_cli_dtype_is_a_choice(tiny_checkpoint, tmp_path, capsys):
    """Before: any string, refused only by the exporter (its help a free-form list)."""
    with pytest.raises(SystemExit) as exc:
        main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(tmp_path / "m.gguf"),
              "--dtype", "bf4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --dtype: invalid choice: 'bf4'" in err
    assert "{f32,f16,q8_0,q4_0,rq4}" in err and list(tmp_path.iterdir()) == []


def test_an_output_that_would_replace_its_source_or_another_file_is_refused(tiny_checkpoint, tmp_path):
    weights = tiny_checkpoint.path / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FelixError, match="not a GGUF file"):
        export_gguf(tiny_checkpoint.path, weights, "f16")
    with pytest.raises(FelixError, match="sit inside the checkpoint"):
        export_gguf(tiny_checkpoint.path, tiny_checkpoint.path / "m.gguf", "f16")
    notes = tmp_path / "notes.gguf"
    notes.write_text("keep me")
    with pytest.raises(FelixError, match="notes.gguf exists and is not a GGUF file"):
        export_gguf(tiny_checkpoint.path, notes, "f16")
    with pytest.raises(FelixError, match="adapter output .*not a GGUF file"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16", notes)
    assert weights.read_bytes() == before and notes.read_text() == "keep me"
    # an earlier export is a GGUF file, and replaced
    export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f32")
    export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]


def _with_weight(tiny_checkpoint, tmp_path: Path, value: float) -> Path:
    bad = Path(shutil.copytree(tiny_checkpoint.path, tmp_path / "ckpt"))
    state = load_file(str(bad / "model.safetensors"))
    state["layers.0.mlp.up_proj.weight"][3, 7] = value
    save_file(state, str(bad / "model.safetensors"))
    return bad


def test_non_finite_or_unencodable_weights_are_refused_by_name(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bad = _with_weight(tiny_checkpoint, tmp_path, float("nan"))
    with pytest.raises(FelixError, match="layers.0.mlp.up_proj.weight has 1 NaN/inf values; refusing to export"):
        export_gguf(bad, out / "m.gguf", "rq4")
    big = _with_weight(tiny_checkpoint, tmp_path / "big", 1e5)
    with pytest.raises(FelixError, match=r"blk.0.ffn_up.weight: its largest magnitude 1e\+05 overflows f16"):
        export_gguf(big, out / "m.gguf", "f16")
    assert list(out.iterdir()) == []
    export_gguf(big, out / "m.gguf", "q8_0")  # q8_0's block scale holds it
    assert np.isfinite(gguf_tensors(out / "m.gguf")["blk.0.ffn_up.weight"][1]).all()


def test_checkpoint_disagreeing_with_its_config_fails_cleanly(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (bad / f).write_bytes((tiny_checkpoint.path / f).read_bytes())
    doc = json.loads((tiny_checkpoint.path / "trainer.json").read_text())
    doc = copy.deepcopy(doc)
    doc["config"]["model"]["d_ff"] = 96
    (bad / "trainer.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FelixError, match="weights do not match the config.*ffn|shape mismatch"):
        export_gguf(bad, out / "m.gguf", "f16")
    assert list(out.iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tiny_checkpoint, tmp_path, monkeypatch):
    import felix.export_gguf as eg

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(eg, "write_lora_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16", tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_an_error_and_leaves_no_file(tiny_checkpoint, tmp_path, capsys, file_size_limit):
    """Before: the OSError of the write was a traceback (rc 1)."""
    out = tmp_path / "m.gguf"
    export_gguf(tiny_checkpoint.path, out, "q8_0")
    before = out.read_bytes()
    with file_size_limit(8192):  # the GGUF is larger: its write fails midway, as on a full disk
        rc = main(["export", "gguf", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out), "--dtype", "f32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"felix export gguf: error: output {out}: cannot write the GGUF"), err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_symlinked_out_is_written_through(tiny_checkpoint, tmp_path):
    """Before: the link was replaced by a file, its target left stale."""
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "m-v1.gguf"
    export_gguf(tiny_checkpoint.path, target, "f32")
    (tmp_path / "current.gguf").symlink_to("models/m-v1.gguf")
    (tmp_path / "lora.gguf").symlink_to("models/lora-v1.gguf")  # dangling: written where it points
    export_gguf(tiny_checkpoint.path, tmp_path / "current.gguf", "q8_0", tmp_path / "lora.gguf")
    assert (tmp_path / "current.gguf").is_symlink() and (tmp_path / "lora.gguf").is_symlink()
    assert gguf_tensors(target)["blk.0.ffn_up.weight"][0] == gguf.GGMLQuantizationType.Q8_0
    assert (tmp_path / "models" / "lora-v1.gguf").read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["lora-v1.gguf", "m-v1.gguf"]


def test_tokens_longer_than_llama_cpp_pythons_buffer_are_warned_of_once(tiny_checkpoint, tmp_path, monkeypatch):
    """A tokenizer trained before the cap holds a newline-and-spaces token longer than 32 bytes, which
    llama-cpp-python decodes as b"" (indentation silently lost). Before, the export said nothing."""
    corpus = tmp_path / "indented.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"if x:\n{' ' * 40}return {i}\n"}) + "\n" for i in range(50)))
    monkeypatch.setattr("felix.tokenizer.MAX_TOKEN_BYTES", 1000)  # the trainer as it was before the cap
    ckpt = Path(shutil.copytree(tiny_checkpoint.path, tmp_path / "ckpt"))
    with pytest.warns(UserWarning, match="yields only"):  # a small corpus: fewer tokens than asked, no matter
        tok = train_tokenizer([corpus], 400, ckpt / "tokenizer.json")
    monkeypatch.undo()
    pieces = [t for t in tok.pieces if t not in SPECIAL_TOKENS]  # one character per byte
    longest, n = max(map(len, pieces)), sum(len(t) > 32 for t in pieces)
    assert longest > 32 and tok.vocab_size <= 400
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    said = [str(w.message) for w in caught if "llama-cpp-python" in str(w.message)]
    assert len(said) == 1 and (tmp_path / "m.gguf").is_file()
    assert f"{n} token{'s are' if n > 1 else ' is'} longer than 32 bytes (the longest {longest})" in said[0]
    assert "llama.cpp itself decodes them" in said[0] and "Retraining the tokenizer" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # the shipped tokenizer, capped, warns of nothing
        warnings.simplefilter("always")
        export_gguf(tiny_checkpoint.path, tmp_path / "capped.gguf", "f16")
    assert not [w for w in caught if "llama-cpp-python" in str(w.message)]
