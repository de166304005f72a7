"""Model-level quantization: tensor policy, fake quant, the packed artifact, `felix quantize`, generation."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import config_from_dict
from felix.errors import FelixError
from felix.generate import generate
from felix.llama_memory import kv_cache_bytes
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.quant_artifact import MANIFEST, WEIGHTS, read_artifact
from felix.quant_formats import FORMATS
from felix.quantize import (
    fake_quantize_model,
    fake_quantized,
    pack_state,
    quant_plan,
    tensor_encoding,
    unpack_state,
)
from felix.tokenizer import train_tokenizer

CONFIG = {"model": {"vocab_size": 320, "n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 256, "max_seq_len": 64,
                    "splice_every": 2, "splice_rank": 8},
          "train": {"seq_len": 64}}
TEXT = ("The quick brown fox jumps over the lazy dog. Quantization keeps refusals: I can't help with that. "
        '{"name": "felix", "ok": true} ') * 20


def tiny_model(seed: int = 0) -> FelixLM:
    torch.manual_seed(seed)
    model = FelixLM(config_from_dict(CONFIG).model)
    for core in model.splice_cores().values():  # a live SpliceCore (b starts at zero)
        torch.nn.init.normal_(core.b, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, FelixLM]:
    """A step-N checkpoint of a random-init tiny model with a real tokenizer.json."""
    root = tmp_path_factory.mktemp("quant_ckpt")
    (root / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n", encoding="utf-8")
    train_tokenizer([root / "text.jsonl"], 300, root / "tokenizer.json", min_frequency=1)
    model = tiny_model()
    path = save_checkpoint(root / "run", 10, model, config_from_dict(CONFIG), {},
                           tokenizer_path=root / "tokenizer.json")
    return path, model


def quantize_cli(capsys, *args: str) -> tuple[int, dict | None, str]:
    rc = main(["quantize", *args])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 and "--json" in args else None), err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- policy ------------------------------------------------------------------------------------
def test_tensor_policy():
    state = tiny_model().state_dict()
    plan = quant_plan(state, "rq4")
    assert plan["layers.0.attn.q_proj.weight"] == plan["layers.1.mlp.down_proj.weight"] == "rq4"
    assert plan["layers.1.mlp.splice.a"] == "rq4"  # (8, 256): SpliceCore is quantized
    assert plan["layers.1.mlp.splice.b"] == "rq4"  # (128, 8) = 1024 elements: rows shorter than a block
    assert plan["layers.1.mlp.splice.gate"] == plan["norm.weight"] == plan["layers.0.attn_norm.weight"] == "f32"
    assert plan["tok_emb.weight"] == "rq4"
    assert quant_plan(state, "rq4", "q8_0")["tok_emb.weight"] == "q8_0"
    assert quant_plan(state, "rq4", "keep")["tok_emb.weight"] == "f16"
    assert tensor_encoding("layers.1.mlp.splice.b", (64, 8), "rq4") == "f16"  # 512 < 1024 elements
    assert {enc for name, enc in plan.items() if state[name].ndim == 2} == {"rq4"}
    with pytest.raises(FelixError, match="x.weight: shape \\(30, 48\\) has 1440 elements, not a multiple of the nf4"):
        quant_plan({"x.weight": torch.zeros(30, 48)} | {"y": torch.zeros(64, 64)}, "nf4")
    with pytest.raises(FelixError, match="embedding policy 'fp8'"):
        quant_plan(state, "rq4", "fp8")


# -- fake quant ------------------------------------------------------------------------------------
def test_fake_quantized_copy_equals_the_packed_weights():
    """In memory; every format through the written artifact: test_every_format_round_trips..."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fq = fake_quantize_model(model, "rq4", "q8_0")
    unpacked = unpack_state(pack_state(model.state_dict(), "rq4", "q8_0"))
    for name, value in fq.state_dict().items():
        assert torch.equal(value, unpacked[name]), name
        assert torch.equal(model.state_dict()[name], before[name])  # the original is untouched
    assert not torch.equal(fq.tok_emb.weight, model.tok_emb.weight)


def test_fake_quantized_context_forward_and_straight_through_gradient():
    model = tiny_model().train()
    ref = fake_quantize_model(model, "rq4").train()
    x = torch.randint(0, 320, (2, 16))
    params_before = {n: p for n, p in model.named_parameters()}
    with fake_quantized(model, "rq4"):
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
    ref_loss = ref(x[:, :-1], targets=x[:, 1:])
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # identity STE: d loss / d w equals d loss / d q evaluated at the quantized weights
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p is params_before[name]  # same Parameter objects: an optimizer keeps working
        assert torch.allclose(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6), name
    assert set(model.state_dict()) == set(ref.state_dict())  # parametrizations removed on exit
    assert not torch.equal(model.tok_emb.weight, ref.tok_emb.weight)  # weights themselves not quantized


# -- artifact and CLI --------------------------------------------------------------------------
def test_artifact_size_accounting_matches_the_file(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "art"
    rc, report, _ = quantize_cli(capsys, "--checkpoint", str(path), "--format", "rq4", "--out", str(out), "--json")
    assert rc == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert (out / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    blob = (out / WEIGHTS).read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    for name, entry in manifest["tensors"].items():
        start, end = header[name]["data_offsets"]
        assert end - start == entry["bytes"], name
        if entry["encoding"] == "rq4":
            numel = torch.Size(entry["shape"]).numel()
            assert entry["bytes"] == numel // 32 * 18
            want = FORMATS["rq4"].quantize(model.state_dict()[name]).numpy().tobytes()
            assert blob[8 + header_len + start : 8 + header_len + end] == want, name
    total = sum(e["bytes"] for e in manifest["tensors"].values())
    assert len(blob) == 8 + header_len + total
    numel = sum(v.numel() for v in model.state_dict().values())  # parameters + the SpliceCore gate buffers
    assert report["weight_bytes"] == total and report["params"] == numel
    assert report["quantized_bits_per_weight"] == 4.5
    assert report["bits_per_weight"] == pytest.approx(8 * total / numel)
    f32 = sum(v.numel() for k, v in model.state_dict().items() if v.ndim < 2)
    assert report["by_encoding"]["f32"]["bytes"] == 4 * f32
    assert report["quantized_params"] + f32 == report["params"]
    assert report["kv_cache_bytes"] == 2 * 2 * 128 * 2048 * 2
    assert report["deployment_bytes"] == (total + report["kv_cache_bytes"] + report["compute_buffer_bytes"]
                                          + report["output_buffer_bytes"]) and report["fits_vram_cap"]
    assert report["seconds"] >= report["quantize_seconds"] > 0
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["rq3", "nf4", "q8_0", "q4_0"])
def test_every_format_round_trips_through_the_artifact(checkpoint, tmp_path, fmt):
    path, model = checkpoint
    out = tmp_path / fmt
    assert main(["quantize", "--checkpoint", str(path), "--format", fmt, "--out", str(out),
                 "--embeddings", "keep"]) == 0
    manifest, packed = read_artifact(out)
    assert manifest["quant_format"] == fmt and packed["tok_emb.weight"].encoding == "f16"
    expected = fake_quantize_model(model, fmt, "keep").state_dict()
    for name, value in unpack_state(packed).items():
        assert torch.equal(value, expected[name]), name


def test_generate_from_a_quantized_artifact(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(path), "--format", "rq4", "--out", str(out)]) == 0
    loaded, tok, ckpt = load_model(out)
    assert ckpt.trainer_state["quantized"]["quant_format"] == "rq4"
    reference = fake_quantize_model(model, "rq4")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    prompt = "The quick brown"
    want = generate(reference, tok.encode(prompt), 12, greedy=True, stop_ids=tok.stop_ids)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", prompt, "--greedy", "--max-new-tokens", "12",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == len(want) > 0
    assert result["completion"] == tok.decode([t for t in want if t not in tok.stop_ids])


def test_config_source_reports_without_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(CONFIG))
    rc, report, _ = quantize_cli(capsys, "--config", str(cfg), "--format", "q8_0", "--json")
    assert rc == 0 and report["out"] is None and report["quantized_bits_per_weight"] == 8.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    assert kv_cache_bytes(config_from_dict({"model": {"n_layers": 24, "d_model": 1024, "n_heads": 16}}).model) \
        == 2 * 24 * 1024 * 2048 * 2


# -- bad input: clear errors, nothing written ---------------------------------------------------
def _corrupt(checkpoint: Path, tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad" / checkpoint.name
    shutil.copytree(checkpoint, bad)
    state = load_file(str(bad / "model.safetensors"))
    edit(state)
    save_file(state, str(bad / "model.safetensors"))
    return bad


def test_nan_missing_and_misshaped_weights_fail_without_output(checkpoint, tmp_path, capsys):
    path, _ = checkpoint

    def nan(state):
        state["layers.1.mlp.up_proj.weight"][3, 7] = float("nan")

    def inf(state):
        state["layers.1.mlp.splice.a"][0, 0] = float("inf")

    def missing(state):
        del state["layers.0.attn.v_proj.weight"]

    def misshaped(state):
        state["layers.0.mlp.down_proj.weight"] = torch.zeros(128, 128)

    cases = [(nan, "layers.1.mlp.up_proj.weight has 1 NaN/inf"), (inf, "layers.1.mlp.splice.a has 1 NaN/inf"),
             (missing, "missing tensor layers.0.attn.v_proj.weight"),
             (misshaped, r"layers.0.mlp.down_proj.weight has shape \(128, 128\), the config wants \(128, 256\)")]
    for i, (edit, message) in enumerate(cases):
        work = tmp_path / str(i)
        work.mkdir()
        bad = _corrupt(path, work, edit)
        out = work / "out"
        rc, _, err = quantize_cli(capsys, "--checkpoint", str(bad), "--format", "rq4", "--out", str(out))
        assert rc == 2, message
        assert "model.safetensors" in err and re.search(message, err), err
        assert not out.exists() and leftovers(work) == []


def test_existing_output_that_is_not_an_artifact_is_refused(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc, _, err = quantize_cli(capsys, "--checkpoint", str(path), "--format", "rq4", "--out", str(precious))
    assert rc == 2 and "not a felix quantized artifact" in err
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    # an older artifact is replaced whole
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(path), "--format", "q8_0", "--out", str(art)]) == 0
    assert main(["quantize", "--checkpoint", str(path), "--format", "rq4", "--out", str(art)]) == 0
    assert read_artifact(art)[0]["quant_format"] == "rq4" and leftovers(tmp_path) == []


def test_an_artifact_holding_splice_edits_is_not_replaced(checkpoint, tmp_path, capsys):
    """Before: re-quantizing into an artifact edited with `felix splice apply` (quantize first, then edit, as the
    README has it) replaced it whole, its patch stack and so every edit with it, without a word."""
    from felix.patches import PatchStack

    path, _ = checkpoint
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(path), "--format", "q8_0", "--out", str(art)]) == 0
    model, _, _ = load_model(art)
    layer = next(iter(model.splice_cores()))
    stack = PatchStack.open(art)
    patch = stack.apply(model, {f"layers.{layer}.mlp.splice.gate": torch.tensor(0.5)}, {"method": "test"})
    rc, _, err = quantize_cli(capsys, "--checkpoint", str(path), "--format", "rq4", "--out", str(art))
    assert rc == 2 and f"{art} holds splice edits" in err, err
    assert read_artifact(art)[0]["quant_format"] == "q8_0"
    assert [p.id for p in PatchStack.open(art).list()] == [patch.id]
    stack.rollback(model, patch.id)  # an empty stack is no edit: the artifact is replaced
    assert main(["quantize", "--checkpoint", str(path), "--format", "rq4", "--out", str(art)]) == 0
    assert read_artifact(art)[0]["quant_format"] == "rq4"


def test_an_artifacts_manifest_as_output_is_refused(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(path), "--format", "rq4", "--out", str(art)]) == 0
    rc, _, err = quantize_cli(capsys, "--checkpoint", str(path), "--format", "q8_0", "--out", str(art / MANIFEST))
    assert rc == 2 and "not a felix quantized artifact directory" in err
    assert read_artifact(art)[0]["quant_format"] == "rq4" and leftovers(art) == []


def test_malformed_manifest_entries_name_the_manifest(checkpoint, tmp_path):
    path, _ = checkpoint
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(path), "--format", "rq4", "--out", str(art)]) == 0
    manifest = json.loads((art / MANIFEST).read_text())
    name = next(k for k, v in manifest["tensors"].items() if v["encoding"] == "rq4")
    for edit, message in ((lambda e: e.pop("bytes"), "malformed entry"),
                          (lambda e: e.update(shape=[3, 5]), r"shape \[3, 5\]: .*multiple of the rq4 block")):
        broken = json.loads(json.dumps(manifest))
        edit(broken["tensors"][name])
        (art / MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(FelixError, match=rf"manifest.json: tensor {re.escape(name)}: {message}"):
            read_artifact(art)


def test_unknown_format_is_rejected(checkpoint, capsys):
    path, _ = checkpoint
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--checkpoint", str(path), "--format", "q3_k", "--out", "x"])
    assert exc.value.code == 2 and "invalid choice: 'q3_k'" in capsys.readouterr().err
