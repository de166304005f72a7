"""The `felix data` and `felix tokenizer` verbs, run in-process."""

from __future__ import annotations

import json

import pytest

from felix.cli import main
from felix.errors import FelixError


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


def test_corpus_is_deterministic_reused_and_rebuilt(tmp_path, capsys, monkeypatch):
    from felix import corpus

    a, b = tmp_path / "a", tmp_path / "b"
    corpus.build_stdlib_corpus(a, max_bytes=30_000, seed=1)
    corpus.build_stdlib_corpus(b, max_bytes=30_000, seed=1)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("code.jsonl", "docs.jsonl"))
    docs = [json.loads(line)["text"] for line in (a / "docs.jsonl").read_text().splitlines()]
    assert docs and all(d.split(maxsplit=1)[0] in ("module", "class", "function", "asyncfunction") for d in docs)
    # same parameters: reused as is; other parameters: rebuilt, never stale
    stamp = (a / "code.jsonl").stat().st_mtime_ns
    corpus.build_stdlib_corpus(a, max_bytes=30_000, seed=1)
    assert (a / "code.jsonl").stat().st_mtime_ns == stamp
    corpus.build_stdlib_corpus(a, max_bytes=30_000, seed=2)
    assert (a / "code.jsonl").read_bytes() != (b / "code.jsonl").read_bytes()
    assert json.loads((a / "corpus.json").read_text())["params"]["seed"] == 2
    # a directory holding anything else is refused, not replaced
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    assert main(["data", "corpus", "--out", str(tmp_path / "home"), "--max-bytes", "30000"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    # the task source takes the string material of each shipped record
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "dev.jsonl").write_text(json.dumps({"id": "x1", "input": "obs", "reference": {"gist": "g"}}) + "\n")
    assert corpus.task_documents(tasks) == ['obs\n\n{"gist": "g"}']
    (tasks / "dev.jsonl").write_text('{"input": "ok"}\n{broken\n')
    with pytest.raises(FelixError, match=r"dev.jsonl: line 2: invalid JSON"):
        corpus.task_documents(tasks)


def test_shard_errors_exit_2_naming_the_file(tiny_mix, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(["data", "shard", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tiny_mix.tokenizer_path),
                 "--out", str(tmp_path / "s")]) == 2
    assert "bad.jsonl: line 2: not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope.json"), "--text", "x"]) == 2
    assert "tokenizer not found" in capsys.readouterr().err


def test_verify_a_whole_mix_and_audit_errors(tiny_mix, tmp_path, capsys):
    assert main(["data", "verify", "--mix", str(tiny_mix.mix_path), "--json"]) == 0
    verified = last_json(capsys)["verified"]
    assert len(verified) == 2 and all(v["train_tokens"] > 0 and v["val_tokens"] > 0 for v in verified.values())
    assert main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--run", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # --run and --tokens are two answers to one question
        main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--run", str(tmp_path), "--tokens", "5"])
    assert exc.value.code == 2 and "argument --tokens: not allowed with argument --run" in capsys.readouterr().err
    assert main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--tokens", "3200", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "code" in out and "70.00%" in out


@pytest.mark.parametrize("argv", [["data"], ["data", "corpus"], ["data", "shard"], ["data", "verify"],
                                  ["data", "audit"], ["tokenizer"], ["tokenizer", "train"], ["tokenizer", "encode"]])
def test_every_verb_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0 and "usage: felix" in capsys.readouterr().out


def test_verify_names_a_malformed_index(tiny_mix, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_mix.root / "shards" / "prose", tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "index.json").read_text())
    del meta["splits"]["train"]["files"][0]["sha256"]
    (tmp_path / "s" / "index.json").write_text(json.dumps(meta))
    assert main(["data", "verify", str(tmp_path / "s")]) == 2
    assert f"{tmp_path / 's' / 'index.json'}: malformed shard index" in capsys.readouterr().err


def test_corpus_refuses_to_replace_a_file(tmp_path, capsys):
    (tmp_path / "c").write_text("mine")
    assert main(["data", "corpus", "--out", str(tmp_path / "c"), "--max-bytes", "20000"]) == 2
    assert "c: exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "c").read_text() == "mine"


def test_shard_warns_when_a_split_is_left_empty(tiny_mix, tmp_path, capsys):
    """One document stays in train (val takes one only from two up): val is empty, which a mix refuses only when
    training starts."""
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    assert main(["data", "shard", "--input", str(tmp_path / "one.jsonl"), "--tokenizer", str(tiny_mix.tokenizer_path),
                 "--out", str(tmp_path / "shards"), "--json"]) == 0
    captured = capsys.readouterr()
    warning = f"felix data shard: warning: {tmp_path / 'shards'}: the val split has no documents (1 in all)"
    assert warning in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["val"]["documents"] == 0
    assert main(["data", "shard", "--input", str(tiny_mix.root / "code.jsonl"), "--tokenizer",
                 str(tiny_mix.tokenizer_path), "--out", str(tmp_path / "more"), "--val-fraction", "0.1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_audit_of_a_reweighted_run_counts_from_the_reweight(tiny_mix, tmp_path, capsys):
    """After `--resume data.mix=<other weights>` the loader aims at the new weights from the resume on: the audit
    measures those samples against them, and the whole run's beside."""
    from test_trainer import write_config

    from felix.config import load_config
    from felix.datamix import DataMix, MixSource
    from felix.trainer import Trainer

    cfg_path = write_config(tmp_path, tiny_mix, max_steps=5, eval_every=0)
    Trainer(load_config(cfg_path), tmp_path / "run", progress=False).run()  # 20 samples at 0.7 / 0.3
    mix2 = tmp_path / "mix2.yaml"
    DataMix(sources=[MixSource(name=n, shards=tiny_mix.root / "shards" / n, weight=w)
                     for n, w in (("code", 0.2), ("prose", 0.8))]).write(mix2)
    with pytest.warns(UserWarning, match="weights changed"):
        trainer = Trainer(load_config(cfg_path, [f"data.mix={mix2}", "train.max_steps=15"]), tmp_path / "run",
                          resume=True, progress=False)
    trainer.run()  # 40 samples at 0.2 / 0.8
    trainer.close()
    assert main(["data", "audit", "--mix", str(mix2), "--run", str(tmp_path / "run"), "--json"]) == 0
    out = last_json(capsys)
    rows = {r["source"]: r for r in out["sources"]}
    assert {n: r["actual"] for n, r in rows.items()} == {"code": 8 / 40, "prose": 32 / 40}
    assert (out["samples"], out["since_sample"]) == (60, 20)
    assert {n: r["actual_run"] for n, r in rows.items()} == {"code": 22 / 60, "prose": 38 / 60}
    assert rows["code"]["tokens_drawn"] == 22 * 32
    assert main(["data", "audit", "--mix", str(mix2), "--run", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1] == "actual: share of the 40 samples since sample 20, where these weights took effect; run: share " \
                      "of all 60"
    assert text[3].split()[:4] == ["code", "20.00%", "20.00%", "36.67%"]
    # against the mix the run no longer draws under, the audit says so
    assert main(["data", "audit", "--mix", str(tiny_mix.mix_path), "--run", str(tmp_path / "run")]) == 0
    assert "weights are not the ones the run has drawn under since its last reweight" in capsys.readouterr().err


def test_shard_refuses_to_replace_its_own_input_or_tokenizer(tiny_mix, tmp_path, capsys):
    """Re-sharding into a directory that held the source (or the tokenizer) deleted it with the old shards."""
    import shutil

    out = tmp_path / "shards"
    args = ["data", "shard", "--tokenizer", str(tiny_mix.tokenizer_path), "--out", str(out)]
    assert main([*args, "--input", str(tiny_mix.root / "prose.jsonl")]) == 0
    shutil.copy(tiny_mix.root / "prose.jsonl", out / "prose.jsonl")
    assert main([*args, "--input", str(out / "prose.jsonl")]) == 2
    assert f"--input {out / 'prose.jsonl'} lies inside --out {out}" in capsys.readouterr().err
    shutil.copy(tiny_mix.tokenizer_path, out / "tok.json")
    tok = ["--tokenizer", str(out / "tok.json")]
    assert main(["data", "shard", "--input", str(tiny_mix.root / "prose.jsonl"), *tok, "--out", str(out)]) == 2
    assert f"--tokenizer {out / 'tok.json'} lies inside --out" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "prose.jsonl", "tok.json", "train-00000.bin",
                                                      "val-00000.bin"]


def test_shard_names_its_options_in_errors(tiny_mix, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "shard", "--input", str(tiny_mix.root / "prose.jsonl"), "--tokenizer",
              str(tiny_mix.tokenizer_path), "--out", str(tmp_path / "s"), "--min-val-tokens", "-5"])
    assert exc.value.code == 2
    assert "argument --min-val-tokens: must be at least 0, got -5" in capsys.readouterr().err
