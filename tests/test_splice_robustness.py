"""Bad input and interrupted writes around the patch stack and `felix splice`: clear errors naming the file,
line or flag, and a stack on disk that always matches the model it was applied to."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_patches import A1, B1, CFG, edit, fresh_model, same

import felix.patch_format
import felix.patches
from felix.errors import FelixError
from felix.model import FelixLM
from felix.patches import PatchStack
from felix.splice_data import load_prompts, save_prompts, stack_neutral
from felix.splice_edit import METHOD_NAMES, EditRequest, load_requests, save_requests

# -- the patch stack ------------------------------------------------------------------------------------


def _one_patch(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    return model, stack, stack.apply(model, edit(model, [B1], 1), {"method": "test"})


def test_patch_file_whose_before_and_after_shapes_differ_is_named(tmp_path):
    _, _, p = _one_patch(tmp_path)
    path = tmp_path / "splices" / p.file
    tensors = load_file(str(path))
    tensors[f"after/{B1}"] = torch.zeros(3, 4)
    save_file(tensors, str(path))
    with pytest.raises(FelixError, match=rf"{p.file}.*differ in shape.*{B1}"):
        PatchStack.open(tmp_path)


def test_patch_file_lacking_its_after_tensor_names_it(tmp_path):
    _, _, p = _one_patch(tmp_path)
    path = tmp_path / "splices" / p.file
    save_file({k: v for k, v in load_file(str(path)).items() if k != f"after/{B1}"}, str(path))
    with pytest.raises(FelixError, match=rf"lacks tensors for \['{B1}'\]"):
        PatchStack.open(tmp_path)


@pytest.mark.parametrize("names", [B1, [1], None])
def test_stack_entry_whose_names_are_not_a_list_of_names_is_named(tmp_path, names):
    _one_patch(tmp_path)
    stack_json = tmp_path / "splices" / "stack.json"
    doc = json.loads(stack_json.read_text())
    doc["patches"][0]["names"] = names
    stack_json.write_text(json.dumps(doc))
    with pytest.raises(FelixError, match="stack.json.*'names' is not a list"):
        PatchStack.open(tmp_path)


def test_rollback_of_a_patch_that_does_not_fit_the_model_keeps_it(tmp_path):
    """A stack applied to a model of another SpliceCore rank: a clear error, and the patch stays committed
    (before, stack.json was committed without it and then a ValueError left the model unchanged)."""
    _, _, p = _one_patch(tmp_path)
    torch.manual_seed(0)
    other = FelixLM(CFG.model_copy(update={"splice_rank": 2})).eval()
    s0 = other.splice_state()
    stack = PatchStack.open(tmp_path)
    with pytest.raises(FelixError, match=rf"stack.json: cannot roll back {p.id}, it does not fit"):
        stack.rollback(other, p.id)
    assert [q.id for q in PatchStack.open(tmp_path).list()] == [p.id]
    assert same(other.splice_state(), s0)


def test_rollback_whose_commit_fails_leaves_model_and_stack_as_they_were(tmp_path, monkeypatch):
    model, stack, p = _one_patch(tmp_path)
    s1 = model.splice_state()

    def full_disk(target, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(felix.patches, "atomic_write_text", full_disk)
    with pytest.raises(FelixError, match="stack.json: cannot save the patch stack .*No space left"):
        stack.rollback(model, p.id)
    monkeypatch.undo()
    assert same(model.splice_state(), s1)
    assert [q.id for q in PatchStack.open(tmp_path).list()] == [p.id]


def test_an_apply_that_cannot_be_written_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    model, stack, p = _one_patch(tmp_path)
    s1 = model.splice_state()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(felix.patch_format, "save_file", full_disk)  # the patch file itself
    with pytest.raises(FelixError, match=r"splices: cannot write patch p0002-\w+ \(.*No space left"):
        stack.apply(model, edit(model, [A1], 2), {"method": "test"})
    monkeypatch.undo()
    monkeypatch.setattr(felix.patches, "atomic_write_text", full_disk)  # the commit point
    with pytest.raises(FelixError, match="stack.json: cannot save the patch stack"):
        stack.apply(model, edit(model, [A1], 3), {"method": "test"})
    monkeypatch.undo()
    assert same(model.splice_state(), s1)
    assert [q.id for q in PatchStack.open(tmp_path).list()] == [p.id]


def test_a_reader_opening_the_stack_mid_commit_keeps_the_writers_patch_file(tmp_path, monkeypatch):
    """`open` used to delete every file stack.json did not name: a reader (`felix generate` beside a serving
    writer) between a writer's patch file and its stack.json deleted the file the stack then named."""
    model, stack, p1 = _one_patch(tmp_path)
    real = felix.patches.atomic_write_text

    def reader_in_between(target, text):
        PatchStack.open(tmp_path)
        real(target, text)

    monkeypatch.setattr(felix.patches, "atomic_write_text", reader_in_between)
    p2 = stack.apply(model, edit(model, [A1], 2), {})
    monkeypatch.undo()
    reopened = PatchStack.open(tmp_path)
    assert [q.id for q in reopened.list()] == [p1.id, p2.id]
    fresh = fresh_model()
    reopened.restore(fresh)
    assert same(fresh.splice_state(), model.splice_state())


def test_a_stray_file_that_cannot_be_deleted_does_not_undo_a_committed_apply(tmp_path, monkeypatch):
    """Removing strays runs after stack.json is committed: its failure (a file another user owns) used to
    make `apply` take the patch back out of the model while stack.json kept it."""
    model, stack, _ = _one_patch(tmp_path)
    stray = tmp_path / "splices" / "p0009-abcdef.0000.safetensors"
    stray.write_bytes(b"left by a crash")
    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self == stray:
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    p2 = stack.apply(model, edit(model, [A1], 2), {})
    monkeypatch.undo()
    assert stray.exists() and [q.id for q in PatchStack.open(tmp_path).list()][-1] == p2.id
    assert torch.equal(model.splice_state()[A1], p2.after[A1])


def test_a_commit_removes_stale_temp_files_and_keeps_fresh_ones(tmp_path):
    """A hard kill mid-write leaves `.NAME.XXXX.tmp`; nothing removed them. A young one may be another
    process's write in progress (a reader storing a fold), so only an hour-old one goes."""
    model, stack, _ = _one_patch(tmp_path)
    stale = tmp_path / "splices" / ".p0002-abcdef.0000.safetensors.k1l2m3.tmp"
    young = tmp_path / "splices" / ".fold.safetensors.n4o5p6.tmp"
    for f in (stale, young):
        f.write_bytes(b"half a write")
    old = stale.stat().st_mtime - felix.patches.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    PatchStack.open(tmp_path)  # a reader never cleans
    assert stale.exists()
    stack.apply(model, edit(model, [A1], 2), {})
    assert not stale.exists() and young.exists()


def test_a_stack_entry_whose_record_is_not_an_object_is_named(tmp_path):
    _one_patch(tmp_path)
    stack_json = tmp_path / "splices" / "stack.json"
    doc = json.loads(stack_json.read_text())
    doc["patches"][0]["record"] = [["method", "test"]]
    stack_json.write_text(json.dumps(doc))
    with pytest.raises(FelixError, match="stack.json.*'record' is not an object"):
        PatchStack.open(tmp_path)


@pytest.mark.parametrize("request_", [None, {"target": " x"}, {"prompt": "a", "target": " x", "neutral": "n"}])
def test_a_fact_edit_record_with_a_damaged_request_names_stack_json_and_patch(tmp_path, request_):
    """The stack's fact edits are read back as requests (to protect them, to fold them): a hand-damaged
    record was a KeyError or a neutral prompt per letter."""
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    record = {"method": METHOD_NAMES[0]} | ({} if request_ is None else {"request": request_})
    p = stack.apply(model, edit(model, [B1], 1), record)
    with pytest.raises(FelixError, match=rf"stack.json: patch {p.id}'s request"):
        stack_neutral(PatchStack.open(tmp_path))


# -- edit requests and preservation prompts (JSONL) ---------------------------------------------------


def test_requests_and_prompts_with_unicode_line_separators_round_trip(tmp_path):
    """JSON strings hold U+2028, U+2029 and U+0085 unescaped (json.dumps, ensure_ascii=False); splitting the
    file at them (str.splitlines) broke every saved request holding one."""
    reqs = [EditRequest("x = 1\u2028y = ", " z", ["a\x85b = "], ["c\u2029"], id="e0"), EditRequest("def ", " f")]
    save_requests(tmp_path / "e.jsonl", reqs)
    assert load_requests(tmp_path / "e.jsonl") == reqs
    save_prompts(tmp_path / "p.jsonl", ["one\u2028two", "three"])
    assert load_prompts(tmp_path / "p.jsonl") == ["one\u2028two", "three"]


def test_non_utf8_requests_name_the_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"prompt": "a", "target": "b"}\n\n{"prompt": "\xff", "target": "b"}\n')
    with pytest.raises(FelixError, match=r"e\.jsonl:3: not valid UTF-8"):
        load_requests(path)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "", "target": " b"}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a", "target": ""}', "'target' must be a non-empty string"),
    ('{"prompt": "a", "target": 3}', "'target' must be a non-empty string"),
    ('{"prompt": "a", "target": "b", "neutral": "c"}', "'neutral' must be a list"),
    ('{"prompt": "a", "target": "b", "extra": 1}', r"unknown keys \['extra'\]"),
    # before: named by its Python repr ("{'x': 1}", "True") in reports and patch records
    ('{"prompt": "a", "target": "b", "id": {"x": 1}}', "'id' must be a string or an integer"),
    ('{"prompt": "a", "target": "b", "id": true}', "'id' must be a string or an integer"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "a", "target"', "invalid JSON"),
])
def test_bad_request_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "a", "target": " b"}\n   \n' + line + "\n", encoding="utf-8")
    with pytest.raises(FelixError, match=rf"e\.jsonl:3: {message}"):
        load_requests(path)


# -- the command line ----------------------------------------------------------------------------------


def _run(capsys, *args: str) -> tuple[int, str]:
    from felix.cli import main

    capsys.readouterr()
    try:
        rc = main(["splice", *args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("verb", ["apply", "bench"])
@pytest.mark.parametrize("layers", ["0", "1,9", "-1"])
def test_cli_layers_without_splicecore_are_refused_by_name(tiny, capsys, tmp_path, verb, layers):
    """Before: a KeyError traceback from inside the method, after the held-out text was built."""
    ckpt = tiny[2]
    save_requests(tmp_path / "e.jsonl", [EditRequest("def ", " f")])
    request = ["--prompt", "def ", "--target", " f"] if verb == "apply" else ["--edits", str(tmp_path / "e.jsonl"),
                                                                             "--n", "1"]
    rc, err = _run(capsys, verb, "--checkpoint", str(ckpt.path), *request, "--layers", layers)
    assert rc == 2 and "--layers" in err and "not SpliceCore layers of this model (it has [1, 3])" in err
    assert not PatchStack.open(ckpt.path).list()


def test_cli_layers_that_are_not_numbers_say_what_is_expected(tiny, capsys):
    rc, err = _run(capsys, "apply", "--checkpoint", str(tiny[2].path), "--prompt", "def ", "--target", " f",
                   "--layers", "1,x")
    assert rc == 2 and "comma-separated layer numbers" in err and "lambda" not in err


@pytest.mark.parametrize("verb", ["apply", "diagnose"])
def test_cli_target_longer_than_the_context_is_a_clear_error(tiny, capsys, verb):
    """Before: a RuntimeError from the embedding (the prompt was cut to nothing, or not cut at all)."""
    model, tok, ckpt, *_ = tiny
    target = " f" * (model.cfg.max_seq_len + 4)
    assert len(tok.encode(target)) >= model.cfg.max_seq_len
    rc, err = _run(capsys, verb, "--checkpoint", str(ckpt.path), "--prompt", "def ", "--target", target)
    assert rc == 2 and "needs room for at least one prompt token" in err
    assert not PatchStack.open(ckpt.path).list()


def test_an_example_keeps_the_prompt_end_and_refuses_a_target_that_fills_the_context(tiny):
    from felix.splice_examples import make_example

    _, tok, *_ = tiny
    target = tok.encode(" f" * 8)
    prompt = tok.encode("def " * 20)
    ex = make_example(tok, "def " * 20, " f" * 8, len(target) + 3)
    assert ex.ids == tuple(prompt[-3:] + target) and ex.n_prompt == 3
    for max_len in (len(target), len(target) - 1):  # -0 kept the whole prompt, -(-1) all but its first token
        with pytest.raises(FelixError, match="needs room for at least one prompt token"):
            make_example(tok, "def " * 20, " f" * 8, max_len)
