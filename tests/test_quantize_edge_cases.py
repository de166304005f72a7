"""Damaged quantized artifacts: a loader names the file at fault instead of mistaking the directory for
something else or raising a bare TypeError."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_quant_model import checkpoint  # noqa: F401 (shared fixture)

from felix.cli import main
from felix.errors import FelixError
from felix.model_loader import load_model
from felix.quant_artifact import MANIFEST, WEIGHTS, is_quant_artifact, write_artifact


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:  # noqa: F811 (the fixture's name)
    out = tmp_path_factory.mktemp("edge") / "art"
    assert main(["quantize", "--checkpoint", str(checkpoint[0]), "--format", "rq4", "--out", str(out)]) == 0
    return out


def _damaged(artifact: Path, tmp_path: Path, manifest_text: str) -> Path:
    work = tmp_path / "art"
    shutil.copytree(artifact, work)
    (work / MANIFEST).write_text(manifest_text, encoding="utf-8")
    return work


@pytest.mark.parametrize("cut, message", [
    (lambda text: text[: len(text) // 2], "unreadable manifest"),  # truncated: not JSON
    (lambda text: "[1, 2]", "not a felix-quant v1 manifest"),  # JSON, not an object
])
def test_a_damaged_manifest_is_named_not_taken_for_a_training_checkpoint(artifact, tmp_path, cut, message):
    work = _damaged(artifact, tmp_path, cut((artifact / MANIFEST).read_text(encoding="utf-8")))
    with pytest.raises(FelixError, match=f"{MANIFEST}: {message}"):
        load_model(work)
    with pytest.raises(FelixError, match=f"{MANIFEST}: {message}"):
        load_model(work / MANIFEST)


def test_a_damaged_artifact_is_still_not_replaced(checkpoint, artifact, tmp_path):  # noqa: F811
    """Loading takes it for an artifact to say what is wrong; writing over it still needs an intact one."""
    work = _damaged(artifact, tmp_path, "{")
    assert is_quant_artifact(work)
    with pytest.raises(FelixError, match="not a felix quantized artifact directory"):
        write_artifact(work, {}, None, {"format": "rq4"})
    assert (work / MANIFEST).read_text(encoding="utf-8") == "{"


def test_a_directory_with_a_stray_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / MANIFEST).write_text("not json", encoding="utf-8")
    assert not is_quant_artifact(tmp_path)  # no weights.safetensors beside it


@pytest.mark.parametrize("value", [["rq4"], {"name": "rq4"}])
def test_a_quant_format_that_is_not_a_string_is_a_clear_error(artifact, tmp_path, value):
    manifest = json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))
    manifest["quant_format"] = value
    work = _damaged(artifact, tmp_path, json.dumps(manifest))
    with pytest.raises(FelixError, match=f"{MANIFEST}: malformed manifest: unknown quant_format"):
        load_model(work)


# -- an --out that holds what --config reads -------------------------------------------------------
def _config_in(directory: Path, **data: str) -> Path:
    from test_quant_model import CONFIG

    cfg = directory / "cfg.yaml"
    cfg.write_text(json.dumps(CONFIG | ({"data": data} if data else {})), encoding="utf-8")
    return cfg


def test_an_out_holding_the_config_is_refused_not_deleted(artifact, tmp_path, capsys):
    work = tmp_path / "art"
    shutil.copytree(artifact, work)
    cfg = _config_in(work)
    before = sorted(p.name for p in work.iterdir())
    assert main(["quantize", "--config", str(cfg), "--format", "q8_0", "--out", str(work)]) == 2
    assert f"--out {work} holds the config" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == before  # the artifact is replaced whole: nothing was


def test_an_out_holding_the_configs_tokenizer_elsewhere_is_refused(artifact, tmp_path, capsys):
    work = tmp_path / "art"
    shutil.copytree(artifact, work)
    (work / "keep").mkdir()
    shutil.copyfile(work / "tokenizer.json", work / "keep" / "tok.json")
    cfg = _config_in(tmp_path, tokenizer=str(work / "keep" / "tok.json"))
    assert main(["quantize", "--config", str(cfg), "--format", "q8_0", "--out", str(work)]) == 2
    assert f"--out {work} holds the tokenizer" in capsys.readouterr().err
    assert (work / "keep" / "tok.json").is_file()


def test_the_configs_tokenizer_as_the_outs_own_is_rewritten_in_place(artifact, tmp_path):
    """An artifact's tokenizer.json named by the config is copied into the new artifact under the same name."""
    work = tmp_path / "art"
    shutil.copytree(artifact, work)
    tokenizer = (work / "tokenizer.json").read_bytes()
    cfg = _config_in(tmp_path, tokenizer=str(work / "tokenizer.json"))
    assert main(["quantize", "--config", str(cfg), "--format", "q8_0", "--out", str(work)]) == 0
    assert (work / "tokenizer.json").read_bytes() == tokenizer
    assert load_model(work)[2].quant_format == "q8_0"


def test_an_out_that_cannot_be_replaced_is_refused_before_the_source_is_read(tmp_path, capsys):
    """Before: refused only when writing, after reading the checkpoint and quantizing it (minutes, with GPTQ);
    here the checkpoint does not even exist, and the error is the --out one."""
    (tmp_path / "notes.txt").write_text("mine")
    rc = main(["quantize", "--checkpoint", str(tmp_path / "missing"), "--format", "rq4",
               "--out", str(tmp_path / "notes.txt")])
    assert rc == 2 and "notes.txt exists and is not a felix quantized artifact" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_artifact_a_server_serves_is_not_replaced_under_it(checkpoint, artifact, tmp_path, capsys):  # noqa: F811
    """Before, `felix quantize --out` replaced the files of an artifact `felix serve` was serving: the server went on
    with weights that were gone, and its next splice write would have been saved beside other ones."""
    work = Path(shutil.copytree(artifact, tmp_path / "art"))
    weights = (work / WEIGHTS).read_bytes()
    argv = ["quantize", "--checkpoint", str(checkpoint[0]), "--format", "q8_0", "--out", str(work)]
    server = subprocess.Popen([sys.executable, "-m", "felix", "serve", "--checkpoint", str(work), "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, server.kill)  # a server that never starts still ends
    guard.start()
    try:
        assert any("patches restored" in line for line in server.stderr), "the server did not start"
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "the artifact at --out is in use" in err and f"(felix serve, pid {server.pid} on " in err, err
        assert (work / WEIGHTS).read_bytes() == weights
    finally:
        guard.cancel()
        server.terminate()
        server.wait(60)
        server.stderr.close()
    assert main(argv) == 0  # stopped, it is free to replace
    assert json.loads((work / MANIFEST).read_text(encoding="utf-8"))["quant_format"] == "q8_0"
