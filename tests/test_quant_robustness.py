"""Bad input to quantization gives clear errors, not tracebacks: `--out` that cannot or must not be written,
corrupt artifacts, impossible shapes, survival arguments that would fail only after the work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quant_model import checkpoint, leftovers, quantize_cli  # noqa: F401 (shared fixture)

from felix.cli import main
from felix.config import FelixConfig
from felix.errors import FelixError
from felix.model_loader import load_model
from felix.quant_artifact import MANIFEST, WEIGHTS, read_artifact, write_artifact
from felix.quant_formats import FORMATS, QuantError

Q_PROJ = "layers.0.attn.q_proj.weight"


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:  # noqa: F811 (the fixture's name)
    out = tmp_path_factory.mktemp("robust") / "art"
    assert main(["quantize", "--checkpoint", str(checkpoint[0]), "--format", "rq4", "--out", str(out)]) == 0
    return out


def _copy(artifact: Path, tmp_path: Path) -> Path:
    work = tmp_path / "art"
    shutil.copytree(artifact, work)
    return work


# -- where the artifact goes -----------------------------------------------------------------------
def test_an_out_that_cannot_be_created_names_it(checkpoint, tmp_path, capsys):  # noqa: F811
    (tmp_path / "afile").write_text("keep me")
    rc, _, err = quantize_cli(capsys, "--checkpoint", str(checkpoint[0]), "--format", "rq4",
                              "--out", str(tmp_path / "afile" / "art"))
    assert rc == 2 and "afile/art: lies under the file" in err, err  # found before the work
    assert (tmp_path / "afile").read_text() == "keep me" and leftovers(tmp_path) == []
    # write_artifact, which runs after it, still names what it cannot write
    with pytest.raises(FelixError, match="afile/art: cannot write the artifact"):
        write_artifact(tmp_path / "afile" / "art", {}, FelixConfig(), {"format": "rq4"})
    assert (tmp_path / "afile").read_text() == "keep me" and leftovers(tmp_path) == []


def test_an_empty_out_is_an_error_not_a_silent_skip(checkpoint, capsys):  # noqa: F811
    rc, _, err = quantize_cli(capsys, "--checkpoint", str(checkpoint[0]), "--format", "rq4", "--out", "")
    assert rc == 2 and "--out is empty" in err


def test_an_out_inside_the_checkpoint_is_refused(checkpoint, capsys):  # noqa: F811
    path = checkpoint[0]
    before = sorted(p.name for p in path.iterdir())
    rc, _, err = quantize_cli(capsys, "--checkpoint", str(path), "--format", "rq4", "--out", str(path / "art"))
    assert rc == 2 and "inside the checkpoint" in err, err
    assert sorted(p.name for p in path.iterdir()) == before


def test_out_dot_replaces_the_artifact_it_is_run_in(checkpoint, artifact, tmp_path, monkeypatch):  # noqa: F811
    work = _copy(artifact, tmp_path)
    monkeypatch.chdir(work)
    assert main(["quantize", "--checkpoint", str(checkpoint[0]), "--format", "q8_0", "--out", "."]) == 0
    assert read_artifact(work)[0]["quant_format"] == "q8_0" and leftovers(tmp_path) == []


def test_a_symlinked_out_is_written_through(checkpoint, artifact, tmp_path):  # noqa: F811
    work = _copy(artifact, tmp_path)
    (tmp_path / "current").symlink_to(work.name)
    assert main(["quantize", "--checkpoint", str(checkpoint[0]), "--format", "q8_0",
                 "--out", str(tmp_path / "current")]) == 0
    assert (tmp_path / "current").is_symlink() and read_artifact(work)[0]["quant_format"] == "q8_0"
    assert leftovers(tmp_path) == []


def test_a_full_disk_is_an_error_and_the_earlier_artifact_stays(checkpoint, artifact, tmp_path, capsys,  # noqa: F811
                                                                 file_size_limit):
    """Before: safetensors' SafetensorError (not an OSError) went past write_artifact as a traceback."""
    work = _copy(artifact, tmp_path)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    with file_size_limit(4096):  # the weights are larger: their write fails midway, as on a full disk
        rc, _, err = quantize_cli(capsys, "--checkpoint", str(checkpoint[0]), "--format", "q8_0",
                                  "--out", str(work))
    assert rc == 2 and err.splitlines()[-1].startswith(f"felix quantize: error: {work}: cannot write the artifact")
    assert "File too large" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before and leftovers(tmp_path) == []


# -- corrupt artifacts -------------------------------------------------------------------------------
def _entry(**change):
    return lambda m: m["tensors"][Q_PROJ].update(change)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.clear() or m.update(format="felix-quant", format_version=1, tensors=["x"], config={}),
     "'tensors' and 'config' must be JSON objects"),
    (lambda m: m.pop("config"), "'tensors' and 'config' must be JSON objects"),
    (lambda m: m.pop("quant_format"), "unknown quant_format None"),
    (_entry(shape=[-128, -128]), f"tensor {Q_PROJ}: malformed entry .*shape \\[-128, -128\\]"),
    (_entry(shape=[128.0, 128]), f"tensor {Q_PROJ}: malformed entry .*shape \\[128.0, 128\\]"),
    (_entry(encoding=["rq4"]), f"tensor {Q_PROJ}: malformed entry .*encoding \\['rq4'\\]"),
])
def test_a_malformed_manifest_is_a_clear_error(artifact, tmp_path, edit, message):
    work = _copy(artifact, tmp_path)
    manifest = json.loads((work / MANIFEST).read_text())
    edit(manifest)
    (work / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FelixError, match=f"manifest.json: .*{message}"):
        load_model(work)


def test_a_manifest_that_is_not_an_object_is_a_clear_error(artifact, tmp_path):
    work = _copy(artifact, tmp_path)
    (work / MANIFEST).write_text("[1, 2]")
    with pytest.raises(FelixError, match="manifest.json: not a felix-quant v1 manifest"):
        read_artifact(work)


def test_corrupt_scale_bytes_are_refused_at_load(artifact, tmp_path):
    work = _copy(artifact, tmp_path)
    stored = load_file(str(work / WEIGHTS))
    stored[Q_PROJ][:2] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)  # the first block's fp16 scale: NaN
    save_file(stored, str(work / WEIGHTS), metadata={"format": "felix-quant"})
    # as an artifact written before contents digests (a digest would refuse the damage first): the NaN check
    manifest = json.loads((work / MANIFEST).read_text())
    del manifest["tensors"][Q_PROJ]["blake2b"]
    (work / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FelixError, match=f"weights.safetensors: tensor {Q_PROJ} has 32 NaN/inf values"):
        load_model(work)


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_refuses_negative_dimensions(name):
    f = FORMATS[name]
    packed = f.quantize(torch.randn(2, 64))
    with pytest.raises(QuantError, match=r"shape \[-2, -64\]: negative dimension"):
        f.dequantize(packed, (-2, -64))


# -- felix quant survival: arguments checked before the work ---------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--val-windows", "0"], "argument --val-windows: must be at least 1, got 0"),
    (["--probe-limit", "-1"], "argument --probe-limit: must be at least 0, got -1"),
    (["--json-prompts", "-2"], "argument --json-prompts: must be at least 0, got -2"),
])
def test_survival_rejects_bad_counts(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["quant", "survival", "--checkpoint", str(tmp_path / "none"), "--format", "rq4", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_survival_plot_into_a_missing_directory_fails_first(tmp_path, capsys):
    plot = tmp_path / "nodir" / "margins.png"
    assert main(["quant", "survival", "--checkpoint", str(tmp_path / "none"), "--format", "rq4",
                 "--plot", str(plot)]) == 2
    assert f"--plot {plot}: directory {plot.parent} does not exist" in capsys.readouterr().err



def test_an_artifact_where_a_training_checkpoint_is_needed_is_named(artifact, capsys):
    from felix.checkpoint import load_checkpoint  # what quantize and train --init-from read

    rc, _, err = quantize_cli(capsys, "--checkpoint", str(artifact), "--format", "q8_0")
    assert rc == 2 and "is a `felix quantize` artifact, not a training checkpoint" in err, err
    with pytest.raises(FelixError, match="artifact, not a training checkpoint"):
        load_checkpoint(artifact)
    assert load_model(artifact)[2].quant_format == "rq4"  # the inference loader still reads it
