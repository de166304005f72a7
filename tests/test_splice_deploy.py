"""Applied splices travel to deployment: `felix quantize` (GPTQ or plain SpliceCore rounding), the
exports and `felix generate` see the edited model; non-edit patches are not taken for edits."""

from __future__ import annotations

import base64
import json
import shutil

import gguf
import pytest
import torch
from splice_helpers import cli_json, counterfactual, train_tiny

from felix.cli import main
from felix.errors import FelixError
from felix.model_loader import load_model
from felix.patches import PatchStack
from felix.quant_formats import get_format
from felix.splice_covariance import inputs_at_targets
from felix.splice_data import stack_edits


@pytest.fixture(scope="module")
def spliced(tmp_path_factory, tiny_mix):
    """A rank-16 tiny checkpoint (SpliceCore a 16x128, b 64x16: both RQ4 blocks) with one fact edit
    applied through the CLI and a gate-bias patch on top, as a server's /splice/edit leaves one."""
    ckpt = train_tiny(tmp_path_factory.mktemp("deploy"), tiny_mix, splice_rank=16)
    model, tok, _ = load_model(ckpt)
    ex = counterfactual(model, tok, "import ", rank=1)
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    rc = main(["splice", "apply", "--checkpoint", str(ckpt), "--prompt", prompt, "--target", target,
               "--layers", "1,3", "--max-ppl-increase", "1", "--max-neutral-kl", "10", "--json"])
    assert rc == 0
    stack = PatchStack.open(ckpt)
    edited, _, _ = load_model(ckpt)
    stack.restore(edited)
    gate = {"layers.3.mlp.splice.gate": torch.tensor(1.25)}
    stack.apply(edited, gate, {"method": "gate_bias", "request": {"endpoint": "/api/v1/splice/edit",
                                                                  "gate_biases": {"3": 0.25}}})
    return ckpt, ex, tok


def test_stack_edits_are_the_fact_edits_only(spliced):
    ckpt, ex, tok = spliced
    stack = PatchStack.open(ckpt)
    assert len(stack) == 2
    assert stack_edits(stack, tok, 64) == [ex]


def test_load_model_with_splices_is_the_edited_model(spliced):
    ckpt, ex, _ = spliced
    from felix.splice_examples import greedy_hits

    plain, _, _ = load_model(ckpt)
    edited, _, _ = load_model(ckpt, splices=True)
    assert float(edited.splice_cores()[3].gate) == 1.25 and float(plain.splice_cores()[3].gate) == 1.0
    assert not torch.equal(edited.splice_cores()[1].a, plain.splice_cores()[1].a)
    assert greedy_hits(plain, [ex]) == [False]


def test_quantize_carries_the_splices_and_gptq_keeps_the_edit_closer(spliced, tmp_path, capsys):
    ckpt, ex, _ = spliced
    edited, _, _ = load_model(ckpt, splices=True)
    rq4 = get_format("rq4")
    rc, gptq = cli_json(capsys, "quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(tmp_path / "g"))
    assert rc == 0
    assert gptq["splices"] | {"preserve_windows": None, "seconds": None} == {
        "patches": 2, "fact_edits": 1, "rounding": "gptq", "edit_share": 0.5, "preserve_windows": None, "seconds": None}
    rc, plain = cli_json(capsys, "quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(tmp_path / "p"),
                     "--splice-rounding", "plain")
    assert rc == 0 and plain["splices"]["rounding"] == "plain"
    g_model, _, _ = load_model(tmp_path / "g")
    p_model, _, _ = load_model(tmp_path / "p")
    for L, core in edited.splice_cores().items():
        # plain: the edited tensors, rounded to their nearest grid values; the gate patch kept exactly
        assert torch.equal(p_model.splice_cores()[L].a, rq4.fake_quant(core.a.detach()))
        assert torch.equal(p_model.splice_cores()[L].gate, core.gate)
        assert torch.equal(g_model.splice_cores()[L].gate, core.gate)
        g_a = g_model.splice_cores()[L].a
        assert torch.equal(rq4.fake_quant(g_a), g_a) and not torch.equal(g_a, p_model.splice_cores()[L].a)

    def out(m):  # SpliceCore outputs at the edit's target positions, through the model's own inputs
        cores = m.splice_cores()
        return {L: cores[L].gate * cores[L].b.detach() @ (cores[L].a.detach() @ u)
                for L, u in inputs_at_targets(m, [1, 3], [ex]).items()}

    want = out(edited)
    err = {name: sum(float((o[L] - want[L]).norm()) for L in want)
           for name, o in (("gptq", out(g_model)), ("plain", out(p_model)))}
    assert err["gptq"] < err["plain"], err


def test_splice_rounding_is_gptq_only_where_the_format_has_a_codebook(spliced, tmp_path, capsys):
    """Before: the default and an explicit --splice-rounding gptq rounded q8_0/q4_0 plainly, saying nothing."""
    ckpt = str(spliced[0])
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", ckpt, "--format", "q8_0", "--splice-rounding", "gptq",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--splice-rounding gptq needs a codebook format (rq4, rq3, nf4), not q8_0" in err
    assert not (tmp_path / "a").exists()
    for given in ([], ["--splice-rounding", "auto"]):
        rc, out = cli_json(capsys, "quantize", "--checkpoint", ckpt, "--format", "q4_0", *given)
        assert rc == 0 and out["splices"] == {"patches": 2, "fact_edits": 1, "rounding": "plain"}


def test_exports_and_generate_see_the_splices(spliced, tmp_path, capsys):
    ckpt, ex, tok = spliced
    from felix.export_gguf import export_gguf

    report = export_gguf(ckpt, tmp_path / "m.gguf", "f32", tmp_path / "adapter.gguf")
    assert report["splice_patches"] == 2
    edited, _, _ = load_model(ckpt, splices=True)
    tensors = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "adapter.gguf")).tensors}
    core = edited.splice_cores()[3]  # edited by the fact edit, and its gate patched to 1.25
    lora_a = torch.from_numpy(tensors["blk.3.ffn_down.weight.lora_a"].copy()).reshape(core.a.shape)
    lora_b = torch.from_numpy(tensors["blk.3.ffn_down.weight.lora_b"].copy()).reshape(core.b.shape)
    assert torch.equal(lora_a, core.a.detach()) and torch.equal(lora_b, (core.b * 1.25).detach())
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    rc, gen = cli_json(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", prompt, "--max-new-tokens", "1",
                   "--greedy")
    assert rc == 0 and gen["completion"] == target


def _off_grid(state: dict[str, torch.Tensor]) -> list[str]:
    rq4 = get_format("rq4")
    return [k for k, t in state.items() if not k.endswith("gate") and not torch.equal(rq4.fake_quant(t), t)]


def test_edits_on_a_quantized_artifact_stay_unrounded_and_every_loader_serves_them_folded(spliced, tmp_path, capsys):
    from felix.export_gguf import export_gguf
    from felix.heldout import heldout_nll
    from felix.server_api import SpliceService
    from felix.splice_data import preservation_windows, splice_texts
    from felix.splice_edit import EditRequest, save_requests
    from felix.splice_examples import greedy_hits
    from felix.splice_quant import gptq_requantizer

    ckpt, _, tok = spliced
    art = tmp_path / "art"
    assert cli_json(capsys, "quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(art))[0] == 0
    model, _, loaded = load_model(art)
    assert not _off_grid(model.splice_state())  # the artifact as packed
    exs = [counterfactual(model, tok, start, rank=1) for start in ("return ", "import ")]
    save_requests(tmp_path / "edits.jsonl", [EditRequest(tok.decode(e.ids[: e.n_prompt]), tok.decode(e.target))
                                             for e in exs])
    rc, out = cli_json(capsys, "splice", "apply", "--checkpoint", str(art), "--edits", str(tmp_path / "edits.jsonl"),
                   "--layers", "1,3", "--max-ppl-increase", "1", "--max-neutral-kl", "10")
    assert out["applied"] >= 1
    stack = PatchStack.open(art)
    assert all(p.record["folded_to"] == "rq4" for p in stack.list())
    assert _off_grid(stack.top().after)  # the stack keeps the edits as computed
    # what a loader serves: the whole stack GPTQ-rounded once over every edit's keys
    stack.restore(model)
    gptq_requantizer(preservation_windows(loaded, model), stack_edits(stack, tok, 64), "rq4")(model)
    folded = model.splice_state()
    served, _, _ = load_model(art, splices=True)
    assert all(torch.equal(served.splice_state()[k], v) for k, v in folded.items())
    last = next(r for r in reversed(out["results"]) if r["accepted"])
    last_ex = exs[out["results"].index(last)]
    assert last["metrics"]["success"] and greedy_hits(served, [last_ex]) == [True]  # judged as served
    heldout, _ = splice_texts(loaded, served)
    assert last["metrics"]["served_nll_after"] == heldout_nll(served, heldout)  # the very model apply judged
    report = export_gguf(art, tmp_path / "m.gguf", "f32", tmp_path / "adapter.gguf")
    tensors = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "adapter.gguf")).tensors}
    a1 = folded["layers.1.mlp.splice.a"]
    lora_a = torch.from_numpy(tensors["blk.1.ffn_down.weight.lora_a"].copy()).reshape(a1.shape)
    assert report["splice_patches"] == len(stack) and torch.equal(lora_a, a1)

    # the server serves the fold, keeps later writes unrounded, and re-folds on every write and on restart
    with pytest.raises(FelixError, match="unrounded edits"):
        SpliceService.load(art, push_rounding="gptq")
    service = SpliceService.load(art)
    assert service.status()["push_rounding"] == "fold"
    assert all(torch.equal(service.model.splice_state()[k], v) for k, v in folded.items())
    name = "layers.3.mlp.splice.a"
    pushed = folded[name] * 1.01 + 1e-3
    data = pushed.float().contiguous().numpy().astype("<f4").tobytes()
    service.push_tensor({"name": name, "data": base64.b64encode(data).decode()})
    assert torch.equal(service.stack.top().after[name], pushed) and not _off_grid(service.model.splice_state())
    assert not torch.equal(service.model.splice_state()[name], folded[name])
    restarted = SpliceService.load(art)
    assert all(torch.equal(restarted.model.splice_state()[k], v) for k, v in service.model.splice_state().items())
    restarted.rollback({})
    assert all(torch.equal(restarted.model.splice_state()[k], v) for k, v in folded.items())


def test_a_bench_on_a_quantized_artifact_measures_the_stack_as_served(spliced, tmp_path, capsys, monkeypatch):
    from felix.splice_edit import EditRequest, save_requests

    ckpt, _, tok = spliced
    art = tmp_path / "art"
    # rq3: the re-quantized figures must round onto the artifact's own grid (they took RQ4's on any artifact)
    assert cli_json(capsys, "quantize", "--checkpoint", str(ckpt), "--format", "rq3", "--out", str(art))[0] == 0
    model, _, _ = load_model(art)
    requests = []
    for start in ("return ", "import "):
        ex = counterfactual(model, tok, start, rank=1)
        requests.append(EditRequest(tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target), neutral=["def "]))
    save_requests(tmp_path / "edits.jsonl", requests)
    # --preserve-windows: the edits' own text; the served fold keeps the artifact's (requantized_gptq took this)
    rc, out = cli_json(capsys, "splice", "bench", "--checkpoint", str(art), "--edits", str(tmp_path / "edits.jsonl"),
                   "--n", "2", "--layers", "1,3", "--max-ppl-increase", "1", "--max-neutral-kl", "10",
                   "--keep-patches", str(tmp_path / "stack"), "--preserve-windows", "8")
    assert rc == 0 and out["applied"] >= 1
    patches = PatchStack.open(tmp_path / "stack").list()
    assert all(p.record["folded_to"] == "rq3" for p in patches) and _off_grid(patches[-1].after)
    assert not (art / "splices").exists()  # the bench writes nothing beside the artifact, no stored fold either
    # an edit's own cost is judged unrounded, and what is served folded: two different models
    metrics = patches[-1].record["metrics"]
    assert metrics["served_nll_after"] != metrics["heldout_nll_after"]
    # the final rates read the fold; `requantized_gptq` folds the final stack afresh: the same model
    folded = out["requantized_gptq"]
    for key in ("retention_rate", "locality_rate", "ppl_drift"):
        assert out[key] == folded[key], key
    assert out["requantized_format"] == "rq3"
    # stopped after its last edit and resumed, it reads the served fold it had recorded: the same figures
    import felix.splice_bench as splice_bench

    save = splice_bench.save_progress

    def stop_after_last(path, identity, progress):
        save(path, identity, progress)
        if progress.step == 2:
            raise KeyboardInterrupt

    args = ["splice", "bench", "--checkpoint", str(art), "--edits", str(tmp_path / "edits.jsonl"), "--n", "2",
            "--layers", "1,3", "--max-ppl-increase", "1", "--max-neutral-kl", "10", "--preserve-windows", "8",
            "--out", str(tmp_path / "b")]
    with monkeypatch.context() as m:
        m.setattr(splice_bench, "save_progress", stop_after_last)
        assert main(args) == 130
    rc, resumed = cli_json(capsys, *args, "--resume")
    assert rc == 0
    drop = ("seconds", "plot")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in out.items() if k not in drop}
    # on an fp32 checkpoint nothing is folded
    rc, out = cli_json(capsys, "splice", "bench", "--checkpoint", str(ckpt), "--edits", str(tmp_path / "edits.jsonl"),
                   "--n", "1", "--layers", "1,3", "--max-ppl-increase", "1", "--max-neutral-kl", "10",
                   "--keep-patches", str(tmp_path / "fp32"))
    assert rc == 0 and all("folded_to" not in p.record for p in PatchStack.open(tmp_path / "fp32").list())
    assert out["requantized_format"] == "rq4"


def test_gptq_rounding_without_the_training_text_says_what_to_do(spliced, tmp_path, capsys):
    ckpt, _, _ = spliced
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    trainer = json.loads((moved / "trainer.json").read_text())
    trainer["config"]["data"]["mix"] = str(tmp_path / "gone.yaml")
    (moved / "trainer.json").write_text(json.dumps(trainer))
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", str(moved), "--format", "rq4", "--out", str(tmp_path / "a")]) == 2
    assert "--splice-rounding plain" in capsys.readouterr().err and not (tmp_path / "a").exists()
    rc, out = cli_json(capsys, "quantize", "--checkpoint", str(moved), "--format", "rq4", "--out", str(tmp_path / "a"),
                   "--splice-rounding", "plain")
    assert rc == 0 and out["splices"]["rounding"] == "plain"


def _push_all(service, state: dict[str, torch.Tensor]) -> None:
    for name in sorted((k for k in state if not k.endswith("gate")), key=lambda k: (int(k.split(".")[1]), k)):
        data = state[name].detach().float().contiguous().numpy().astype("<f4").tobytes()
        assert service.push_tensor({"name": name, "data": base64.b64encode(data).decode()})["status"] == "ok"


def test_a_quantized_server_gptq_rounds_pushes_closer_than_plain(spliced, tmp_path, capsys):
    """fp32 tensors pushed into an RQ4 artifact land on the grid either way; GPTQ's SpliceCore output over
    the training text is closer to what was pushed than plain rounding's."""
    from felix.server_api import SpliceService
    from felix.splice_covariance import input_covariance
    from felix.splice_data import preservation_windows

    ckpt, _, _ = spliced
    rc, _ = cli_json(capsys, "quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(tmp_path / "g"))
    assert rc == 0
    shutil.copytree(tmp_path / "g", tmp_path / "p")
    edited, _, loaded = load_model(ckpt, splices=True)
    pushed = edited.splice_state()
    services = {"gptq": SpliceService.load(tmp_path / "g"),  # the default, auto: GPTQ where it can
                "plain": SpliceService.load(tmp_path / "p", push_rounding="plain")}
    rq4 = get_format("rq4")
    err = {}
    for name, service in services.items():
        assert service.status()["push_rounding"] == name
        _push_all(service, pushed)
        top = service.stack.top()
        assert top.record["request"]["rounding"] == name
        model = service.model
        preserve = preservation_windows(loaded, model)
        err[name] = 0.0
        for L, cov in input_covariance(model, [1, 3], preserve).items():
            core, pre = model.splice_cores()[L], f"layers.{L}.mlp.splice."
            assert torch.equal(rq4.fake_quant(core.a.detach()), core.a) and torch.equal(rq4.fake_quant(core.b), core.b)
            e = (core.b @ core.a - pushed[pre + "b"] @ pushed[pre + "a"]).detach().double()
            err[name] += float(torch.trace(e @ cov.double() @ e.t()))
    assert err["gptq"] < err["plain"], err


def test_push_rounding_settings_are_checked(spliced, tmp_path):
    from felix.errors import FelixError
    from felix.server_api import SpliceService

    ckpt, _, _ = spliced
    for rounding in ("gptq", "fold"):
        with pytest.raises(FelixError, match="codebook format"):
            SpliceService.load(ckpt, push_rounding=rounding)  # an fp32 checkpoint: nothing to round to
    with pytest.raises(FelixError, match="auto, fold, gptq, plain"):
        SpliceService.load(ckpt, push_rounding="best")
    assert SpliceService.load(ckpt).status()["push_rounding"] is None  # auto on fp32: nothing to round
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["config"]["data"]["mix"] = str(tmp_path / "gone.yaml")
    (art / "manifest.json").write_text(json.dumps(manifest))
    for rounding in ("gptq", "fold"):
        with pytest.raises(FelixError, match="training text"):
            SpliceService.load(art, push_rounding=rounding)
    # auto falls back to plain rounding without the training text, and says why
    service = SpliceService.load(art)
    assert service.status()["push_rounding"] == "plain" and "gone.yaml" in service.push_rounding_note
    assert SpliceService.load(art, push_rounding="plain").push_rounding_note is None
