"""What a user of live edits runs into: a stack copied beside another checkpoint, an edit file with a bad line
below good ones, an edit that contradicts one already applied, output paths that cannot be written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from splice_helpers import LOOSE_KL, copy_checkpoint, counterfactual, splice_cli
from test_patches import A1, B1, edit, fresh_model, same

from felix.errors import FelixError
from felix.patch_format import STACK_FILE
from felix.patches import PatchStack
from felix.splice_edit import EditRequest, save_requests
from felix.splice_examples import Example

# -- the stack belongs to the model it was made on ----------------------------------------------------


def test_a_stack_made_on_other_weights_is_refused_not_restored(tmp_path):
    """Before: a stack copied beside another checkpoint of the same shape (or this one trained further) was
    restored with a log line, its SpliceCore tensors replacing the trained ones of a model they were not made for."""
    model = fresh_model()
    PatchStack.open(tmp_path).apply(model, edit(model, [A1, B1], 1), {"method": "test"})
    trained_further = fresh_model()
    with torch.no_grad():
        trained_further.tok_emb.weight[0, 0] += 1e-3
    before = trained_further.splice_state()
    with pytest.raises(FelixError, match="made on other weights than this checkpoint's"):
        PatchStack.open(tmp_path).restore(trained_further)
    assert same(trained_further.splice_state(), before)
    assert "base" in json.loads((tmp_path / "splices" / STACK_FILE).read_text())
    # the model it was made on restores it, and so does one whose SpliceCore alone differs (a server re-quantizes
    # SpliceCore before restoring: that is logged, not refused)
    requantized = fresh_model()
    with torch.no_grad():
        requantized.layers[1].mlp.splice.a.mul_(1.001)
    for other in (fresh_model(), requantized):
        PatchStack.open(tmp_path).restore(other)
        assert same(other.splice_state(), model.splice_state())


def test_a_stack_without_a_base_is_restored_as_before_and_gets_one_on_its_next_write(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    stack.apply(model, edit(model, [A1], 1), {"method": "test"})
    path = tmp_path / "splices" / STACK_FILE
    doc = json.loads(path.read_text())
    del doc["base"]  # as written before the field existed
    path.write_text(json.dumps(doc))
    other = fresh_model()
    with torch.no_grad():
        other.tok_emb.weight[0, 0] += 1e-3
    PatchStack.open(tmp_path).restore(other)  # unchecked: nothing says which model it was
    reopened = PatchStack.open(tmp_path)
    reopened.apply(model, edit(model, [B1], 2), {"method": "test"})
    assert json.loads(path.read_text())["base"] == PatchStack.open(tmp_path).base is not None
    # an emptied stack belongs to no model: the next first patch names its own
    for p in reversed(reopened.list()):
        reopened.rollback(model, p.id)
    assert "base" not in json.loads(path.read_text())


def test_cli_refuses_a_stack_copied_beside_a_checkpoint_trained_further(tiny, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    ex = counterfactual(model, tok)
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    rc, _, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL)
    assert rc == 0
    further = shutil.copytree(ckpt.path, tmp_path / "further", ignore=shutil.ignore_patterns("splices"))
    weights = load_file(str(further / "model.safetensors"))
    weights["tok_emb.weight"] = weights["tok_emb.weight"] * 1.01  # "trained further"; SpliceCore as it was
    save_file(weights, str(further / "model.safetensors"))
    shutil.copytree(f"{ck}/splices", further / "splices")
    rc, _, err = splice_cli(capsys, "list", "--checkpoint", str(further))
    assert rc == 2 and "made on other weights" in err and "list --json" in err
    rc, out, _ = splice_cli(capsys, "list", "--checkpoint", ck, "--json")
    assert rc == 0 and len(json.loads(out)["patches"]) == 1


# -- edit requests --------------------------------------------------------------------------------------


def test_apply_checks_every_request_before_applying_any(tiny, capsys, tmp_path):
    """Before: the edits above a bad line were applied and committed, then the run stopped on the bad line with
    no report of them (and no --json output at all)."""
    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    ex = counterfactual(model, tok)
    good = EditRequest(tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target))
    too_long = EditRequest("def ", " f" * (model.cfg.max_seq_len + 4), id="long")
    save_requests(tmp_path / "e.jsonl", [good, too_long])
    rc, _, err = splice_cli(capsys, "apply", "--checkpoint", ck, "--edits", str(tmp_path / "e.jsonl"), *LOOSE_KL)
    assert rc == 2 and "'long'" in err and "needs room for at least one prompt token" in err
    assert PatchStack.open(ck).list() == []
    save_requests(tmp_path / "e.jsonl", [good])  # the good one alone applies: the refusal above was the bad line
    rc, _, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--edits", str(tmp_path / "e.jsonl"), *LOOSE_KL)
    assert rc == 0 and len(PatchStack.open(ck).list()) == 1


def test_contradicted_finds_another_token_wanted_after_the_same_tokens():
    from felix.splice_examples import contradicted

    edit_ = Example((5, 6, 7, 8), 2)  # after (5, 6): 7, then 8
    assert contradicted(edit_, [Example((5, 6, 9), 2)]) == 0  # the same fact, another target
    assert contradicted(edit_, [Example((1, 2), 1), Example((5, 6, 7, 9), 3)]) == 1  # its second token
    assert contradicted(edit_, [Example((5, 6, 7, 8), 2), Example((5, 6, 7, 8, 3), 4)]) is None  # agrees, extends
    assert contradicted(edit_, [Example((4, 6, 9), 2), Example((5, 6), 1)]) is None  # another context; unasked


def test_an_edit_contradicting_an_applied_one_is_refused_naming_it(tiny, capsys, tmp_path):
    """Before: kl_train made the new target greedy here, breaking the earlier edit while the stack still listed
    it (closed_form_a refused it as "the target is still not the greedy completion", after the whole method ran,
    with nothing saying why it could not work: the earlier edit's keys are kept)."""
    model, tok, ckpt, *_ = tiny
    ck = copy_checkpoint(ckpt, tmp_path)
    ex = counterfactual(model, tok)
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *LOOSE_KL,
                            "--json")
    first = json.loads(out)["results"][0]["patch_id"]
    other = tok.decode(counterfactual(model, tok, rank=5).target)
    assert rc == 0 and other != target
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", other, *LOOSE_KL,
                            "--json")
    row = json.loads(out)["results"][0]
    assert rc == 1 and not row["accepted"] and row["metrics"]["contradicts"] == first
    assert row["reason"].startswith(f"contradicts {first}") and "roll it back first" in row["reason"]
    assert [p.id for p in PatchStack.open(ck).list()] == [first]
    # rolled back, the fact is free to be edited
    assert splice_cli(capsys, "rollback", "--checkpoint", ck)[0] == 0
    rc, out, _ = splice_cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", other, *LOOSE_KL,
                            "--json")
    assert "contradicts" not in json.loads(out)["results"][0]["reason"]


# -- outputs named before the work ----------------------------------------------------------------------


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_bench_out_that_cannot_be_a_directory_is_named_before_the_bench(tiny, capsys, tmp_path, out):
    """Before: an OSError traceback from mkdir once every edit of the bench had run."""
    ckpt = tiny[2]
    (tmp_path / "afile").write_text("x")
    save_requests(tmp_path / "e.jsonl", [EditRequest("def ", " f")])
    rc, stdout, err = splice_cli(capsys, "bench", "--checkpoint", str(ckpt.path), "--edits",
                                 str(tmp_path / "e.jsonl"), "--n", "1", "--out", str(tmp_path / out))
    why = f"lies under the file {tmp_path / 'afile'}" if "/" in out else "exists and is not a directory"
    assert rc == 2 and f"--out {tmp_path / out}: {why}" in err and "Traceback" not in err, err
    # refused before the bench: no step's row logged, no report written
    assert stdout == "" and "step   1/1" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "e.jsonl"]


def test_make_edits_out_that_is_a_directory_is_named_before_the_search(tiny, capsys, tmp_path):
    """Before: an IsADirectoryError traceback once the facts were found (on this model: none are, so the
    search's own error came instead of the one about --out)."""
    rc, _, err = splice_cli(capsys, "make-edits", "--checkpoint", str(tiny[2].path), "--out", str(tmp_path), "--n", "2")
    assert rc == 2 and f"--out {tmp_path}: is a directory" in err


def test_make_edits_out_in_a_missing_directory_is_named_before_the_search(tiny, capsys, tmp_path):
    """Before: a FileNotFoundError traceback after the search (check_output let a missing parent through, but the
    atomic write makes none)."""
    out = tmp_path / "nowhere" / "edits.jsonl"
    rc, _, err = splice_cli(capsys, "make-edits", "--checkpoint", str(tiny[2].path), "--out", str(out), "--n", "2")
    assert rc == 2 and f"--out {out}: directory {out.parent} does not exist" in err


# -- a spliced checkpoint outlives pruning ----------------------------------------------------------------


def test_pruning_keeps_a_checkpoint_with_edits_and_lets_it_go_once_rolled_back(tmp_path):
    """Before: `felix train --resume` pruned the checkpoint `felix splice apply` had edited, its patch stack with
    it, without a word (keep_last counts checkpoints, not edits)."""
    from test_checkpoint import trained

    from felix.checkpoint import list_checkpoints, save_checkpoint

    cfg, model, opt = trained(1)
    first = save_checkpoint(tmp_path, 1, model, cfg, {}, opt, keep_last=1)
    stack = PatchStack.open(first)
    name = "layers.0.mlp.splice.a"
    stack.apply(model, {name: model.splice_state()[name] + 0.1}, {"method": "test"})
    for step in (2, 3):
        save_checkpoint(tmp_path, step, model, cfg, {}, opt, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]
    assert len(PatchStack.open(first).list()) == 1
    stack.rollback(model, stack.top().id)  # nothing left to lose: pruned as any other
    save_checkpoint(tmp_path, 4, model, cfg, {}, opt, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]


@pytest.mark.parametrize(("stack", "kept"), [('{"format_version": 1, "patches": []}', False), (None, False),
                                             ('{"format_version": 1, "patches": null}', True),
                                             ('{"format_version": 1, "patches": {}}', True),
                                             ('{"format_version": 1}', True), ("[]", True), ("{", True)])
def test_only_an_empty_stack_lets_its_checkpoint_be_pruned(tmp_path, stack, kept):
    """Before: a stack.json whose "patches" was null or {} (one PatchStack refuses to read) counted as empty, and
    pruning deleted the checkpoint with whatever the stack's patch files held."""
    from felix.checkpoint import holds_patches
    from felix.patch_format import SPLICES_DIR

    (tmp_path / SPLICES_DIR).mkdir()
    if stack is not None:
        (tmp_path / SPLICES_DIR / STACK_FILE).write_text(stack)
    assert holds_patches(tmp_path) is kept


def test_an_edit_an_artifact_cannot_store_is_refused_and_the_next_one_still_runs(tiny, capsys, tmp_path):
    """Before: the fold's QuantError (a value past what the format stores) ended `apply` as an error, after the
    edits above it were committed and with no report of them."""
    from felix.cli import main

    model, tok, ckpt, *_ = tiny
    art = str(tmp_path / "art")
    assert main(["quantize", "--checkpoint", copy_checkpoint(ckpt, tmp_path), "--format", "rq4", "--out", art]) == 0
    save_requests(tmp_path / "e.jsonl", [EditRequest("def __init__(self", ","), EditRequest("import os\nimport", " s")])
    rc, out, err = splice_cli(capsys, "apply", "--checkpoint", art, "--edits", str(tmp_path / "e.jsonl"), "--method",
                              "kl_train", "--lr", "1e5", "--steps", "5", "--max-ppl-increase", "100",
                              "--max-neutral-kl", "1e6", "--layers", "3", "--json")
    report = json.loads(out)
    assert rc == 1 and report["rejected"] == 2 and not PatchStack.open(art).list()
    assert all("artifact cannot store the edited SpliceCore" in r["reason"] for r in report["results"])
