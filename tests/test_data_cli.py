"""The `felix data` and `felix tokenizer` verbs, run in-process."""

from __future__ import annotations

import json

import pytest

from felix.cli import main


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tokenizer_then_shard_then_verify(tiny_mix, tmp_path, capsys):
    src = tiny_mix.root / "code.jsonl"
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out",
                 str(tmp_path / "tok.json"), "--json"]) == 0
    assert last_json(capsys)["vocab_size"] == 400
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok.json"), "--text", "def f(): pass",
                 "--json"]) == 0
    assert "".join(last_json(capsys)["tokens"]).replace("Ġ", " ") == "def f(): pass"
    assert main(["data", "shard", "--input", str(src), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "shards"), "--val-fraction", "0.1", "--json"]) == 0
    out = last_json(capsys)
    assert out["train"]["tokens"] > 0 and out["val"]["documents"] > 0
    assert main(["data", "verify", str(tmp_path / "shards"), "--json"]) == 0
    assert str(tmp_path / "shards") in last_json(capsys)["verified"]


def test_verify_fails_with_the_file_named(tiny_mix, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_mix.root / "shards" / "prose", tmp_path / "s")
    (tmp_path / "s" / "val-00000.bin").write_bytes(b"\x00\x00")
    assert main(["data", "verify", str(tmp_path / "s")]) == 2
    assert "val-00000.bin: truncated" in capsys.readouterr().err


def test_audit_simulated_and_from_a_run(tiny_mix, tmp_path, capsys):
    assert main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--tokens", "64000", "--seq-len", "32",
                 "--json"]) == 0
    rows = {r["source"]: r for r in last_json(capsys)["sources"]}
    assert rows["code"]["target"] == pytest.approx(0.7) and rows["code"]["actual"] == pytest.approx(0.7, abs=0.01)
    assert rows["prose"]["tokens_drawn"] + rows["code"]["tokens_drawn"] == 64000
    # a run's checkpoint carries the loader position
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps(
        {"trainer": {"train_loader": {"sample": 10, "counts": {"code": 5, "prose": 5}, "seq_len": 32}}}))
    assert main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--run", str(tmp_path / "run"), "--json"]) == 0
    out = last_json(capsys)
    assert "step-00000010" in out["origin"]
    assert {r["source"]: r["actual"] for r in out["sources"]} == {"code": 0.5, "prose": 0.5}


def test_corpus_from_the_standard_library(tmp_path, capsys):
    assert main(["data", "corpus", "--out", str(tmp_path / "c"), "--max-bytes", "200000", "--json"]) == 0
    out = last_json(capsys)
    assert {"code", "docs"} <= set(out["sources"])
    assert 0 < sum(out["bytes"].values()) <= 200000
    first = json.loads((tmp_path / "c" / "code.jsonl").read_text().splitlines()[0])
    assert isinstance(first["text"], str) and first["text"]
