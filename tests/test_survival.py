"""The survival report (felix.survival, `felix quant survival`) on a tiny checkpoint: metric ranges, the
identity comparison (a model against itself is exact), real quantization noise, the CLI contract, and a
checkpoint with applied splices measured as `felix quantize` packs it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from felix.checkpoint import latest_checkpoint
from felix.cli import main
from felix.commands.quant import render
from felix.config import ModelConfig, config_from_dict
from felix.errors import FelixError
from felix.model import FelixLM
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.quail import resolve_whitelist
from felix.quantize import fake_quantize_model
from felix.shards import ShardSet
from felix.survival import (
    compare,
    json_validity,
    plot_margins,
    probe_refusal,
    probe_windows,
    survival_report,
    val_metrics,
    whitelist_metrics,
)
from felix.trainer import Trainer

TINY_MODEL = {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
              "max_seq_len": 64, "splice_every": 2, "splice_rank": 4}
TINY_TRAIN = {"seq_len": 32, "micro_batch_size": 4, "max_steps": 3, "lr": 3e-3, "warmup_steps": 1,
              "eval_every": 3, "eval_batches": 1, "ckpt_every": 3, "keep_last": 1, "dtype": "fp32", "threads": 1}


def _common_token(tiny_mix) -> str:
    """A string that is one token and common in the val split: the whitelist the tests probe."""
    tok = tiny_mix.tokenizer
    val = np.concatenate(ShardSet.open(tiny_mix.root / "shards" / "code").tokens("val"))
    for tid in np.bincount(val).argsort()[::-1]:
        s = tok.decode([int(tid)])
        if tok.encode(s) == [int(tid)]:
            return s
    raise AssertionError("no single-token string in the val split")


def _train(tmp_path_factory, tiny_mix, name: str, **model) -> Path:
    """A 3-step run of the tiny model (`model` overrides its shape)."""
    cfg = config_from_dict({"model": TINY_MODEL | model, "train": TINY_TRAIN,
                            "data": {"tokenizer": str(tiny_mix.tokenizer_path), "mix": str(tiny_mix.mix_path)}})
    run = tmp_path_factory.mktemp(name) / "run"
    Trainer(cfg, run, progress=False).run()
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_mix) -> tuple[Path, str]:
    """A 3-step checkpoint and a whitelist string: a single token that is common in the val split."""
    return _train(tmp_path_factory, tiny_mix, "survival"), _common_token(tiny_mix)


def test_model_against_itself_is_exact(tiny_run, tiny_mix):
    run, token = tiny_run
    model, tok, ckpt = load_model(latest_checkpoint(run))
    wl = resolve_whitelist(tok, [token])
    r = compare(model, copy.deepcopy(model), tok, wl, ckpt.config.data.mix, 32, val_windows_per_source=4,
                json_prompts=0, keep_margins=True)
    w, v = r["whitelisted"], r["val"]
    assert w["positions"] > 0
    assert w["top1_agreement"] == 1.0 and w["refusal_rate_drop"] == 0.0
    assert w["margin_full"] == w["margin_quant"] and r["margins"]["full"] == r["margins"]["quant"]
    assert v["kl"] == pytest.approx(0.0, abs=1e-7) and v["top1_agreement"] == 1.0
    assert v["ppl_full"] == pytest.approx(v["ppl_quant"]) and v["ppl_full"] > 1
    assert v["false_refusal_full"] == v["false_refusal_quant"]


def test_quantized_metrics_are_in_range(tiny_run, tmp_path):
    run, token = tiny_run
    model, tok, ckpt = load_model(latest_checkpoint(run))
    wl = resolve_whitelist(tok, [token])
    quant = fake_quantize_model(model, "rq3").eval()
    r = compare(model, quant, tok, wl, ckpt.config.data.mix, 32, val_windows_per_source=4, json_prompts=1,
                keep_margins=True)
    w, v, j = r["whitelisted"], r["val"], r["json_validity"]
    for key in ("top1_agreement", "refusal_rate_full", "refusal_rate_quant"):
        assert 0.0 <= w[key] <= 1.0
    # survival is defined where full precision emits the target somewhere (a positive margin)
    full_hits = int((np.array(r["margins"]["full"]) > 0).sum())
    assert (w["survival"] is None) == (full_hits == 0) and (w["survival"] is None or 0.0 <= w["survival"] <= 1.0)
    assert v["kl"] > 0 and 0.0 <= v["top1_agreement"] <= 1.0
    assert 0.0 <= v["false_refusal_full"] <= 1.0 and 0.0 <= v["false_refusal_quant"] <= 1.0
    assert r["margins"]["full"] != r["margins"]["quant"]  # 3-bit weights move the logits
    assert j["prompts"] == 1 and j["valid_full"] in (0.0, 1.0)
    # the refusal rate counts whitelisted argmaxes: recompute it from the margins' sign for the full model
    # (margin > 0 means the whitelisted target is the argmax)
    assert w["refusal_rate_full"] >= np.mean(np.array(r["margins"]["full"]) > 0) - 1e-9
    assert plot_margins({"rq3": r["margins"]}, tmp_path / "m.png").stat().st_size > 1000


def test_probe_windows_end_before_whitelisted_targets(tiny_run, tiny_mix):
    run, token = tiny_run
    tok = tiny_mix.tokenizer
    wl = resolve_whitelist(tok, [token])
    toks = np.arange(100, dtype=np.int64) % 7 + 300
    toks[[3, 40, 77]] = wl.ids[0]
    x, y = probe_windows([toks], wl, context=10, limit=10)
    assert x.shape == (2, 10) and y.tolist() == [wl.ids[0]] * 2  # position 3 has too little context
    assert x[0].tolist() == toks[30:40].tolist() and x[1].tolist() == toks[67:77].tolist()
    x, _ = probe_windows([toks], wl, context=10, limit=1)
    assert len(x) == 1


def test_cli_json(tiny_run, capsys, tmp_path):

    run, token = tiny_run
    plot = tmp_path / "margins.png"
    assert main(["quant", "survival", "--checkpoint", str(run), "--format", "q4_0", "--tokens", token,
                 "--json-prompts", "0", "--val-windows", "2", "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["format"] == "q4_0" and out["whitelist"]["tokens"] == [token] and out["step"] == 3
    assert {"top1_agreement", "refusal_rate_full", "refusal_rate_quant", "margin_full", "margin_quant"} <= \
        out["whitelisted"].keys()
    assert {"ppl_full", "ppl_quant", "kl", "top1_agreement"} <= out["val"].keys()
    assert out["plot"] == str(plot) and plot.is_file()


def test_cli_errors_without_whitelist(tiny_run, capsys):

    run, _ = tiny_run
    assert main(["quant", "survival", "--checkpoint", str(run), "--format", "rq4"]) == 2
    assert "quail.tokens" in capsys.readouterr().err
    assert main(["quant", "survival", "--checkpoint", str(run), "--format", "rq4", "--tokens", "no such token"]) == 2


def test_a_plot_path_that_cannot_take_the_plot_is_refused_before_the_work(tiny_run, tmp_path, monkeypatch,
                                                                         capsys):
    """Before: --plot overwrote the checkpoint's own files (rc 0), and a directory or an unwritable path
    was a traceback after the whole measurement."""
    import felix.survival

    run, token = tiny_run
    ckpt = latest_checkpoint(run)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    before = {p: p.read_bytes() for p in (ckpt / "model.safetensors", ckpt / "trainer.json", notes)}
    measured = []
    monkeypatch.setattr(felix.survival, "survival_report", lambda *a, **k: measured.append(1) or {})
    for plot, said in [(ckpt / "model.safetensors", "sit inside the checkpoint"),
                       (ckpt / "margins.png", "sit inside the checkpoint"),
                       (notes, "notes.txt exists and is not a PNG file"),
                       (tmp_path, "is a directory"),
                       (tmp_path / "missing" / "m.png", "does not exist"),
                       (Path("/proc/m.png"), "cannot create files in /proc")]:
        capsys.readouterr()
        assert main(["quant", "survival", "--checkpoint", str(run), "--format", "q4_0", "--tokens", token,
                     "--plot", str(plot)]) == 2, plot
        err = capsys.readouterr().err
        assert err.startswith("felix quant survival: error: --plot ") and said in err, err
    assert measured == []  # every one refused before the measurement
    assert {p: p.read_bytes() for p in before} == before and not (ckpt / "margins.png").exists()


def test_an_earlier_plot_is_replaced_and_a_symlinked_plot_written_through(tiny_run, tmp_path, capsys):
    run, token = tiny_run
    target = tmp_path / "plots" / "margins.png"
    target.parent.mkdir()
    plot_margins({"x": {"full": [0.1, 0.5], "quant": [0.2, 0.4]}}, target)
    earlier = target.read_bytes()
    (tmp_path / "latest.png").symlink_to(target)
    assert main(["quant", "survival", "--checkpoint", str(run), "--format", "q4_0", "--tokens", token,
                 "--json-prompts", "0", "--val-windows", "2", "--plot", str(tmp_path / "latest.png")]) == 0
    assert (tmp_path / "latest.png").is_symlink() and target.read_bytes() != earlier
    assert target.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in target.parent.iterdir()) == [
        "margins.png"]


def test_a_plot_that_fails_to_write_still_prints_the_report(tiny_run, tmp_path, capsys, file_size_limit):
    run, token = tiny_run
    plot = tmp_path / "m.png"
    with file_size_limit(1000):  # the PNG is larger: its write fails midway, as on a full disk
        rc = main(["quant", "survival", "--checkpoint", str(run), "--format", "q4_0", "--tokens", token,
                   "--json-prompts", "0", "--val-windows", "2", "--plot", str(plot), "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and json.loads(captured.out)["format"] == "q4_0"
    assert captured.err.startswith(f"felix quant survival: error: --plot {plot}: cannot write the plot")
    assert list(tmp_path.iterdir()) == []


def test_survival_report_matches_compare(tiny_run):
    run, token = tiny_run
    r = survival_report(run, "q8_0", [token], json_prompts=0, val_windows_per_source=2)
    assert r["val"]["kl"] >= 0 and r["val"]["top1_agreement"] > 0.9  # 8-bit barely moves anything
    assert torch.isfinite(torch.tensor(r["val"]["ppl_quant"]))


def test_survival_is_undefined_not_zero_where_full_precision_never_emits_the_target(tiny_run):
    """Before: 0.0 ("every hit lost") when there was no hit to lose."""
    run, token = tiny_run
    model, tok, _ = load_model(latest_checkpoint(run))
    x = torch.tensor([[(7 * i + j) % 500 for j in range(8)] for i in range(4)])
    with torch.no_grad():
        never = model.lm_head(model.final_hidden(x)[:, -1]).argmin(-1)  # the least likely token: never greedy
    w, _ = whitelist_metrics(model, copy.deepcopy(model), x, never, resolve_whitelist(tok, [token]))
    assert w["positions"] == 4 and w["survival"] is None and w["top1_agreement"] == 1.0
    with torch.no_grad():
        greedy = model.lm_head(model.final_hidden(x)[:, -1]).argmax(-1)
    assert whitelist_metrics(model, copy.deepcopy(model), x, greedy, resolve_whitelist(tok, [token]))[0][
        "survival"] == 1.0


def test_survival_report_refuses_a_quantized_artifact(tiny_run, tmp_path):
    """Before: the artifact loads dequantized, so "full precision" was already the quantized model and the
    report claimed a lossless format (KL 0, agreement 1)."""

    run, token = tiny_run
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(run), "--format", "rq3", "--out", str(art)]) == 0
    with pytest.raises(FelixError, match=r"`felix quantize` artifact \(rq3\) has no full-precision weights"):
        survival_report(art, "rq3", [token], json_prompts=0, val_windows_per_source=2)


def test_probe_refusal_keeps_the_end_of_long_prompts_and_refuses_empty_ones(tiny_run):
    """Before: a prompt past max_seq_len raised ValueError mid-experiment; an empty one a dtype RuntimeError."""
    run, token = tiny_run
    model, tok, _ = load_model(latest_checkpoint(run))
    long = "def f(x):\n    return x\n" * 40
    ids = tok.encode(long)
    assert len(ids) > model.cfg.max_seq_len
    with torch.no_grad():
        top = int(model.lm_head(model.final_hidden(torch.tensor([ids[-model.cfg.max_seq_len:]]))[:, -1]).argmax())
    wl = resolve_whitelist(tok, [token])
    r = probe_refusal(model, tok, "q8_0", [long], [], [token])
    assert r["refuse"]["prompts"] == 1 and r["refuse"]["refusal_rate_full"] == float(top in wl.ids)
    # no ordinary prompts: no rate (it was 0.0, which reads as "no false refusals")
    assert r["ordinary"] == {"prompts": 0, "refusal_rate_full": None, "refusal_rate_quant": None,
                             "top1_agreement": None}
    with pytest.raises(FelixError, match="ordinary prompt '' encodes to no tokens"):
        probe_refusal(model, tok, "q8_0", ["x"], [""], [token])


def test_json_validity_leaves_a_short_context_half_for_the_prompt(tiny_run):
    """Before: 64 new tokens in a 64-token context left the prompt 1 token (the instruction cut away)."""
    model, _, _ = load_model(latest_checkpoint(tiny_run[0]))
    assert model.cfg.max_seq_len == 64
    r = json_validity(model, model, load_model(latest_checkpoint(tiny_run[0]))[1], 1, max_new_tokens=64)
    assert r["prompts"] == 1 and r["max_new_tokens"] == 32 and r["valid_full"] == r["valid_quant"]


def test_val_metrics_without_windows_is_a_clear_error(tiny_run):
    """Before: ZeroDivisionError."""
    model, _, _ = load_model(latest_checkpoint(tiny_run[0]))
    with pytest.raises(FelixError, match="no val windows"):
        val_metrics(model, model, torch.zeros((0, 9), dtype=torch.long))


def test_val_shards_past_the_models_vocabulary_name_the_shard(tiny_mix):
    """Before: a val split written with a bigger tokenizer than the model's reached the embedding: a bare
    IndexError, on a GPU a device assert naming nothing."""
    model = FelixLM(ModelConfig(**TINY_MODEL | {"vocab_size": 256})).eval()  # the mix's tokenizer has 512 tokens
    tok = tiny_mix.tokenizer
    wl = resolve_whitelist(tok, [_common_token(tiny_mix)])
    with pytest.raises(FelixError, match=r"(code|prose)/val-\d{5}\.bin: token id \d+ at position \d+ is outside the "
                                         r"vocabulary \(0\.\.255\) of the model \(model\.vocab_size 256\)"):
        compare(model, model, tok, wl, tiny_mix.mix_path, 32, val_windows_per_source=2, json_prompts=0)


# -- survival of a checkpoint with applied splices ----------------------------------------------
@pytest.fixture(scope="module")
def spliced_run(tmp_path_factory, tiny_mix) -> tuple[Path, str]:
    """A 3-step tiny checkpoint with one applied patch on SpliceCore layer 1, and a whitelist string: a
    single token that is common in the val split."""
    # SpliceCore rank 16: a (16 x 128) and b (64 x 16) are RQ4 blocks (rank 4 would keep them as fp16)
    ckpt = latest_checkpoint(_train(tmp_path_factory, tiny_mix, "survival_splices", splice_rank=16))
    model, _, _ = load_model(ckpt)
    g = torch.Generator().manual_seed(0)
    core = model.splice_cores()[1]
    after = {"layers.1.mlp.splice.a": core.a.detach() + 0.2 * torch.randn(core.a.shape, generator=g),
             "layers.1.mlp.splice.b": core.b.detach() + 0.2 * torch.randn(core.b.shape, generator=g)}
    PatchStack.open(ckpt).apply(model, after, {"method": "test_patch"})
    return ckpt, _common_token(tiny_mix)


def test_survival_splice_rounding_is_gptq_only_where_the_format_has_a_codebook(spliced_run, capsys):
    """Before: --splice-rounding gptq (the default) with q8_0/q4_0 measured plain rounding, saying nothing."""
    ckpt, token = spliced_run
    capsys.readouterr()
    assert main(["quant", "survival", "--checkpoint", str(ckpt), "--format", "q4_0", "--tokens", token,
                 "--splice-rounding", "gptq"]) == 2
    assert "--splice-rounding gptq needs a codebook format (rq4, rq3, nf4), not q4_0" in capsys.readouterr().err
    report = survival_report(ckpt, "q8_0", [token], json_prompts=0, probe_limit=8, val_windows_per_source=1,
                             splice_rounding="auto")
    assert report["splices"] == {"patches": 1, "fact_edits": 0, "rounding": "plain"}


def _without_header(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("checkpoint", "format", "embeddings", "step", "splices")}


def test_survival_measures_the_edited_model_against_what_quantize_packs(spliced_run, tiny_mix, tmp_path, capsys):
    ckpt, token = spliced_run
    assert main(["quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(tmp_path / "art")]) == 0
    packed, tok, _ = load_model(tmp_path / "art")  # dequantized: exactly what the artifact computes
    edited, _, _ = load_model(ckpt, splices=True)  # full precision, the patch applied unrounded
    assert not torch.equal(edited.splice_cores()[1].a, load_model(ckpt)[0].splice_cores()[1].a)
    report = survival_report(ckpt, "rq4", [token], json_prompts=0, probe_limit=32, val_windows_per_source=2)
    assert report["splices"] | {"preserve_windows": None, "seconds": None} == {
        "patches": 1, "fact_edits": 0, "rounding": "gptq", "edit_share": 0.5, "preserve_windows": None,
        "seconds": None}
    whitelist = resolve_whitelist(tok, [token])
    want = compare(edited, packed, tok, whitelist, tiny_mix.mix_path, 32, 2, 32, 0)
    assert _without_header(report) == want
    unedited = load_model(ckpt)[0]  # what the report measured when it left the stack out
    assert want != compare(unedited, fake_quantize_model(unedited, "rq4"), tok, whitelist, tiny_mix.mix_path,
                           32, 2, 32, 0)

    capsys.readouterr()
    assert main(["quant", "survival", "--checkpoint", str(ckpt), "--format", "rq4", "--tokens", token,
                 "--json-prompts", "0", "--probe-limit", "32", "--val-windows", "2", "--splice-rounding", "plain",
                 "--json"]) == 0
    out = capsys.readouterr().out
    plain = json.loads(out)  # --json: the object alone
    assert plain["splices"] == {"patches": 1, "fact_edits": 0, "rounding": "plain"}
    assert "1 patches applied" in render(plain)  # what the run without --json prints
    # plain: packing rounds the edited tensors to their nearest grid values
    want = compare(edited, fake_quantize_model(edited, "rq4"), tok, whitelist, tiny_mix.mix_path, 32, 2, 32, 0)
    assert _without_header(plain) == json.loads(json.dumps(want))


def test_a_plot_without_whitelisted_positions_says_it_was_skipped(tiny_run, tmp_path, capsys):
    """Before: no file, no word (rc 0, "plot": null) when the probe windows held no whitelisted target."""
    run, _ = tiny_run
    plot = tmp_path / "m.png"
    args = ["quant", "survival", "--checkpoint", str(run), "--format", "q4_0", "--tokens", "<|end|>",
            "--json-prompts", "0", "--val-windows", "1", "--plot", str(plot)]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["whitelisted"]["positions"] == 0 and out["plot"] is None and not plot.exists()
    assert out["plot_skipped"].startswith("no whitelisted position in the probe windows (whitelist ['<|end|>'])")
    assert main(args) == 0
    assert "margin plot skipped: no whitelisted position in the probe windows" in capsys.readouterr().out


def test_survival_finds_the_mix_of_a_moved_run_directory_as_splicing_does(tmp_path, tiny_mix, capsys):
    """Before: survival read the checkpoint's data.mix as written, so a project directory moved after training was
    "data mix not found: <old path>", where `felix splice` looked beside the checkpoint and above it."""
    import shutil

    base = tmp_path / "project"
    shutil.copytree(tiny_mix.root, base)
    cfg = config_from_dict({"model": TINY_MODEL, "train": TINY_TRAIN,
                            "data": {"tokenizer": str(base / "tokenizer.json"), "mix": str(base / "mix.yaml")}})
    Trainer(cfg, base / "run", progress=False).run()
    moved = base.rename(tmp_path / "moved")
    token = _common_token(tiny_mix)
    argv = ["quant", "survival", "--checkpoint", str(moved / "run"), "--format", "q8_0", "--tokens", token, "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["whitelisted"]["positions"] > 0
    (moved / "mix.yaml").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"its config's data.mix {base / 'mix.yaml'} is not found" in err and "survival measures on" in err
