"""`felix splice apply` run again, on a checkpoint that will be quantized, and what it reports: an edit the stack
already made and that still holds is not made twice; a write RQ4 cannot store is named at apply time; errors name
the edits file's line; `list` says which patches set their tensors."""

from __future__ import annotations

import json

import pytest
import torch
from splice_helpers import LOOSE_KL, copy_checkpoint, counterfactual, splice_cli

from felix.patches import PatchStack
from felix.splice_edit import EditRequest, save_requests
from felix.splice_examples import greedy_hits

# closed_form_a on the rank-16 model (as in test_splice_cli)
CLOSED = ["--method", "closed_form_a", "--layers", "3", "--max-ppl-increase", "1", "--max-neutral-kl", "10"]
# kl_train with a step so large that its write overflows what RQ4 stores (fp16, for the tiny model's small tensors)
HUGE = ["--method", "kl_train", "--lr", "1e5", "--steps", "5", "--max-ppl-increase", "100", "--max-neutral-kl", "1e6",
        "--layers", "3"]


def _request(model, tok, rank: int = 20) -> tuple[str, str]:
    ex = counterfactual(model, tok, rank=rank)
    return tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)


# -- the same request again -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kl_train", "closed_form_a"])
def test_the_same_edit_again_is_reported_already_applied_and_writes_nothing(tiny, tiny_wide, capsys, tmp_path, method):
    """Before: a re-run made a second patch of the same edit: closed_form_a a zero-delta one reported "applied",
    kl_train one that trained on and changed the model."""
    model, tok, ckpt, *_ = tiny if method == "kl_train" else tiny_wide
    opts = LOOSE_KL if method == "kl_train" else CLOSED
    ck = copy_checkpoint(ckpt, tmp_path)
    prompt, target = _request(model, tok, rank=20 if method == "kl_train" else 1)
    save_requests(tmp_path / "e.jsonl", [EditRequest(prompt, target, neutral=["import "], id="e1")])
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--edits", str(tmp_path / "e.jsonl"), *opts, "--json")
    first = json.loads(out)["results"][0]
    assert rc == 0 and first["status"] == "applied"
    state = PatchStack.open(ck).list()[0].after
    # the same file again, in text and JSON; then with another id and another budget: neither is part of the edit
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--edits", str(tmp_path / "e.jsonl"), *opts)
    assert rc == 0 and f"already applied as {first['patch_id']}" in out
    save_requests(tmp_path / "e.jsonl", [EditRequest(prompt, target, neutral=["import "], id="renamed")])
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--edits", str(tmp_path / "e.jsonl"), *opts,
                            "--max-neutral-kl", "20", "--json")
    report = json.loads(out)
    row = report["results"][0]
    assert rc == 0 and (report["applied"], report["rejected"], report["already_applied"]) == (0, 0, 1)
    assert row["status"] == "already_applied" and row["patch_id"] == first["patch_id"]
    assert row["reason"].startswith(f"already applied as {first['patch_id']}")
    patches = PatchStack.open(ck).list()
    assert [p.id for p in patches] == [first["patch_id"]] and patches[0].after.keys() == state.keys()


def test_on_an_artifact_the_same_edit_is_judged_as_served(tiny_wide, capsys, tmp_path):
    """On a codebook artifact an edit holds in the fold of the stack (what every loader serves), read from the fold
    `apply` stored: the same request again writes nothing."""
    from felix.cli import main

    model, tok, ckpt, *_ = tiny_wide
    art = str(tmp_path / "art")
    assert main(["quantize", "--checkpoint", copy_checkpoint(ckpt, tmp_path), "--format", "rq4", "--out", art]) == 0
    ex = counterfactual(model, tok, "import ", rank=1)
    edit = ["--prompt", tok.decode(ex.ids[: ex.n_prompt]), "--target", tok.decode(ex.target), "--layers", "1,3",
            "--max-ppl-increase", "1", "--max-neutral-kl", "10", "--json"]
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", art, *edit)
    first = json.loads(out)["results"][0]
    assert rc == 0 and first["status"] == "applied"
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", art, *edit)
    row = json.loads(out)["results"][0]
    assert rc == 0 and row["status"] == "already_applied" and row["patch_id"] == first["patch_id"]
    assert len(PatchStack.open(art).list()) == 1


def test_another_setting_or_neutral_prompt_is_another_edit(tiny, capsys, tmp_path):
    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    prompt, target = _request(model, tok)
    rc, _, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL)
    assert rc == 0
    for other in (["--steps", "30"], ["--neutral", "import "]):
        rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL,
                                *other, "--json")
        assert json.loads(out)["results"][0]["status"] != "already_applied", other
    assert len(PatchStack.open(ck).list()) == 3


def test_the_same_edit_that_no_longer_holds_is_applied_again_and_says_so(tiny, capsys, tmp_path):
    """A later patch (a push of layer 3's pre-edit tensors) undid the edit: the same request makes it again, as a new
    patch, naming the one that no longer holds."""
    from felix.model_loader import load_model

    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    prompt, target = _request(model, tok)
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL,
                            "--json")
    first = json.loads(out)["results"][0]["patch_id"]
    edited, *_ = load_model(ck)
    stack = PatchStack.open(ck)
    stack.restore(edited)
    undo = stack.list()[0].before
    stack.apply(edited, undo, {"method": "tensor_push", "request": {"name": "undo"}})
    ex = counterfactual(model, tok)
    assert greedy_hits(edited, [ex]) == [False]
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL,
                            "--json")
    row = json.loads(out)["results"][0]
    assert rc == 0 and row["status"] == "applied" and row["no_longer_holds"] == first
    assert len(PatchStack.open(ck).list()) == 3
    edited, *_ = load_model(ck)
    PatchStack.open(ck).restore(edited)
    assert greedy_hits(edited, [ex]) == [True]
    # said in text too
    stack = PatchStack.open(ck)
    stack.restore(edited)
    stack.apply(edited, undo, {"method": "tensor_push", "request": {"name": "undo"}})
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL)
    assert rc == 0 and "no longer holds" in out and out.startswith("applied p0005")


# -- a write the deployment format cannot store -------------------------------------------------------------


def test_a_write_rq4_cannot_store_is_a_warning_naming_the_tensor(tiny, capsys, tmp_path):
    """Before: accepted without a word; `felix quantize` (and a server serving it in rq4) failed later."""
    from felix.cli import main

    ck = copy_checkpoint(tiny[2], tmp_path)
    rc, out, err = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", "def __init__(self", "--target", ",",
                              *HUGE)
    assert rc == 0 and out.startswith("applied p0001")
    assert "warning: rq4 cannot store the edited SpliceCore (tensor layers.3.mlp.splice." in err
    assert "felix quantize --format rq4" in err
    rc, out, _ = splice_cli(capsys, "rollback", "--checkpoint", ck)
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", "def __init__(self", "--target", ",",
                            *HUGE, "--json")
    row = json.loads(out)["results"][0]
    assert rc == 0 and row["accepted"] and "layers.3.mlp.splice." in row["warnings"][0]
    # what the warning says will fail, fails
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", ck, "--format", "rq4", "--out", str(tmp_path / "art")]) == 2
    assert "layers.3.mlp.splice." in capsys.readouterr().err


def test_a_checkpoint_trained_for_rq4_refuses_a_write_rq4_cannot_store(tiny, capsys, tmp_path):
    """A QUAIL run (quail.enabled) was trained for quail.format: there the write is refused, as on an artifact."""
    ck = copy_checkpoint(tiny[2], tmp_path)
    meta = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    meta["config"]["quail"] |= {"enabled": True, "tokens": ["def"]}
    (tmp_path / "ckpt" / "trainer.json").write_text(json.dumps(meta))
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", "def __init__(self", "--target", ",",
                            *HUGE, "--json")
    row = json.loads(out)["results"][0]
    assert rc == 1 and row["status"] == "rejected" and not PatchStack.open(ck).list()
    assert "rq4 cannot store the edited SpliceCore (tensor layers.3.mlp.splice." in row["reason"]
    assert "trained for rq4 deployment (quail.enabled" in row["reason"]


# -- errors name the edits file's line -------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["apply", "bench"])
def test_a_bad_request_is_named_by_file_and_line(tiny, capsys, tmp_path, verb):
    """Before: `edit request 'long'` (its id) or the end of its prompt, and no file or line."""
    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    long = " f" * (model.cfg.max_seq_len + 4)
    path = tmp_path / "e.jsonl"
    good = json.dumps({"prompt": "def ", "target": " g"})
    path.write_text(f"{good}\n\n{json.dumps({'prompt': 'def ', 'target': long})}\n")
    extra = ["--n", "2"] if verb == "bench" else []
    rc, _, err = splice_cli(capsys, verb, "--checkpoint", ck, "--edits", str(path), *extra)
    assert rc == 2 and f"{path}:3: target is" in err
    path.write_text(f"{good}\n{json.dumps({'prompt': 'def ', 'target': long, 'id': 'long'})}\n")
    rc, _, err = splice_cli(capsys, verb, "--checkpoint", ck, "--edits", str(path), *extra)
    assert rc == 2 and f"{path}:2 (id 'long'): target is" in err
    assert not PatchStack.open(ck).list()


# -- list ------------------------------------------------------------------------------------------------


def test_list_says_which_patches_are_absolute_in_json_and_text(tiny, capsys, tmp_path):
    """Before: `list --json` rows left out `absolute`, and the text listing showed a push or a gate edit as
    `'' -> ''`, with neither its tensors nor what it wrote."""
    from felix.model_loader import load_model

    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    prompt, target = _request(model, tok)
    save_requests(tmp_path / "e.jsonl", [EditRequest(prompt, target, id="e7")])
    assert splice_cli(capsys, "apply", "--checkpoint", ck, "--edits", str(tmp_path / "e.jsonl"), *LOOSE_KL)[0] == 0
    edited, *_ = load_model(ck)
    stack = PatchStack.open(ck)
    stack.restore(edited)
    a = "layers.1.mlp.splice.a"
    stack.apply(edited, {a: edited.splice_state()[a] * 0.5},
                {"method": "tensor_push", "request": {"endpoint": "/api/v1/splice/tensor", "name": a, "format": "f32"}})
    stack.apply(edited, {"layers.3.mlp.splice.gate": torch.tensor(0.5)},
                {"method": "gate_bias", "request": {"endpoint": "/api/v1/splice/edit", "gate_biases": {"3": -0.5}}})
    rc, out, _ = splice_cli(capsys, "list", "--checkpoint", ck, "--json")
    rows = json.loads(out)["patches"]
    assert rc == 0 and [r["absolute"] for r in rows] == [False, True, True]
    rc, out, _ = splice_cli(capsys, "list", "--checkpoint", ck)
    fact, push, gate = out.splitlines()
    assert "relative" in fact and "L3.a,b" in fact and "'e7'" in fact and "layers [3]" in fact and repr(target) in fact
    assert "absolute" in push and "L1.a" in push and f"name {a}" in push
    assert "absolute" in gate and "L3.gate" in gate and "gate biases {'3': -0.5}" in gate
