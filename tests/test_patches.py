"""The patch stack: exact rollback, stacking, persistence across reopen, corrupt files named."""

from __future__ import annotations

import json

import pytest
import torch

from felix.config import ModelConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.patches import PatchStack

CFG = ModelConfig(vocab_size=64, n_layers=4, d_model=32, n_heads=4, d_ff=64, max_seq_len=32,
                  splice_every=2, splice_rank=4)
A1, B1, G1 = "layers.1.mlp.splice.a", "layers.1.mlp.splice.b", "layers.1.mlp.splice.gate"
B3 = "layers.3.mlp.splice.b"


def fresh_model() -> FelixLM:
    torch.manual_seed(0)
    return FelixLM(CFG).eval()


def edit(model: FelixLM, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A new value for each named tensor: the current one plus noise (not exactly representable sums)."""
    g = torch.Generator().manual_seed(seed)
    state = model.splice_state()
    return {n: state[n] + 0.1 * torch.randn(state[n].shape, generator=g) for n in names}


def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_apply_then_rollback_top_is_bit_exact(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    s0 = model.splice_state()
    p1 = stack.apply(model, edit(model, [A1, B1], 1), {"method": "test"})
    s1 = model.splice_state()
    p2 = stack.apply(model, edit(model, [B1, B3, G1], 2), {"method": "test"})
    assert [p.id for p in stack.list()] == [p1.id, p2.id]
    assert torch.allclose(p2.before[B1] + p2.deltas[B1], model.splice_state()[B1])
    assert "time" in p1.record
    stack.rollback(model, p2.id)
    assert same(model.splice_state(), s1)
    stack.rollback(model, p1.id)
    assert same(model.splice_state(), s0)
    assert stack.list() == []


def test_rollback_of_a_middle_patch_keeps_later_deltas(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    s0 = model.splice_state()
    p1 = stack.apply(model, edit(model, [B1], 1), {})
    p2 = stack.apply(model, edit(model, [B1, B3], 2), {})
    p3 = stack.apply(model, edit(model, [A1], 3), {})
    stack.rollback(model, p1.id)
    now = model.splice_state()
    # B1 = before(p1) + delta(p2); B3 = p2's after (untouched by p1); A1 = p3's after.
    assert torch.allclose(now[B1], s0[B1] + p2.deltas[B1], atol=1e-6)
    assert torch.equal(now[B3], p2.after[B3]) and torch.equal(now[A1], p3.after[A1])
    assert [p.id for p in stack.list()] == [p2.id, p3.id]
    # The rewritten history stays consistent: rolling the rest back lands exactly on the original state.
    stack.rollback(model, p3.id)
    stack.rollback(model, p2.id)
    assert same(model.splice_state(), s0)


def test_stack_persists_and_restores_bit_exact(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    p1 = stack.apply(model, edit(model, [A1, G1], 1), {"request": {"prompt": "x"}, "method": "push"})
    stack.apply(model, edit(model, [B3], 2), {"method": "push"})
    spliced = model.splice_state()

    reopened = PatchStack.open(tmp_path)
    assert [(p.id, p.record) for p in reopened.list()] == [(p.id, p.record) for p in stack.list()]
    restarted = fresh_model()
    reopened.restore(restarted)
    assert same(restarted.splice_state(), spliced)
    # Rollback after a restart still restores the exact prior tensors, and is itself persisted.
    reopened.rollback(restarted, reopened.top().id)
    assert [p.id for p in PatchStack.open(tmp_path).list()] == [p1.id]
    files = sorted(f.name for f in (tmp_path / "splices").iterdir())
    assert files == sorted(["stack.json", p1.file])


def test_invalid_patches_leave_model_and_stack_unchanged(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    s0 = model.splice_state()
    bad = [
        ({"layers.0.mlp.splice.a": torch.zeros(4, 64)}, "not SpliceCore tensors"),  # layer 0 has no SpliceCore
        ({A1: torch.zeros(3, 64)}, rf"{A1}: shape \(3, 64\) != \(4, 64\)"),
        ({A1: torch.full((4, 64), float("nan"))}, f"{A1}: contains NaN or inf"),
        # one bad tensor spoils all
        ({B1: torch.zeros(32, 4), A1: torch.full((4, 64), float("inf"))}, f"{A1}: contains NaN or inf"),
        ({}, "at least one SpliceCore tensor"),
    ]
    for after, why in bad:
        with pytest.raises(FelixError, match=why):
            stack.apply(model, after, {})
    with pytest.raises(FelixError, match="JSON"):
        stack.apply(model, {B1: torch.zeros(32, 4)}, {"obj": object()})
    with pytest.raises(FelixError, match="no patch"):
        stack.rollback(model, "p9999-000000")
    assert same(model.splice_state(), s0) and stack.list() == []
    assert not (tmp_path / "splices" / "stack.json").exists()


def test_corrupt_stack_file_is_a_clear_error(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    p = stack.apply(model, edit(model, [B1], 1), {})
    stack_json = tmp_path / "splices" / "stack.json"
    good = stack_json.read_text()

    stack_json.write_text("{not json")
    with pytest.raises(FelixError, match="stack.json"):
        PatchStack.open(tmp_path)
    stack_json.write_text(json.dumps({"format_version": 1, "patches": [{"id": "x"}]}))
    with pytest.raises(FelixError, match="stack.json"):
        PatchStack.open(tmp_path)
    stack_json.write_text(good)
    (tmp_path / "splices" / p.file).write_bytes(b"garbage")
    with pytest.raises(FelixError, match=p.file):
        PatchStack.open(tmp_path)


def test_stray_files_from_an_interrupted_write_are_removed(tmp_path):
    model = fresh_model()
    stack = PatchStack.open(tmp_path)
    p = stack.apply(model, edit(model, [B1], 1), {})
    stray = tmp_path / "splices" / "p0002-abcdef.0000.safetensors"
    stray.write_bytes(b"half-written")
    reopened = PatchStack.open(tmp_path)
    assert [q.id for q in reopened.list()] == [p.id]
    # removed by the next commit, not by open (a reader must never delete a concurrent writer's file)
    assert stray.exists()
    reopened.apply(model, edit(model, [A1], 2), {})
    assert not stray.exists()


def test_a_second_writer_is_refused_not_clobbered(tmp_path):
    model = fresh_model()
    server_stack, cli_stack = PatchStack.open(tmp_path), PatchStack.open(tmp_path)
    server_stack.apply(model, edit(model, [B1], 1), {})
    s1 = model.splice_state()
    with pytest.raises(FelixError, match="another process"):
        cli_stack.apply(model, edit(model, [A1], 2), {})
    assert same(model.splice_state(), s1) and len(PatchStack.open(tmp_path).list()) == 1


def test_stack_json_is_canonical_json_after_applies_and_rollbacks(tmp_path):
    """stack.json is written from each patch's kept entry, not encoded whole at every commit; it must stay what
    `json.dumps(indent=1, sort_keys=True)` gives, so stacks written before read the same and diffs stay small."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    path = tmp_path / "splices" / "stack.json"
    odd = {"method": "kl_train", "note": "two\nlines, \"quoted\", é \u2028", "nested": [1, {"z": 2.5, "a": None}]}
    for i, names in enumerate(([A1], [B1, G1], [B3], [A1, B3])):
        stack.apply(model, edit(model, names, i), odd | {"i": i}, absolute=bool(i % 2))
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=1, sort_keys=True)
    stack.rollback(model, stack.list()[1].id)  # rewrites the later patches' files: new entries
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True)
    assert [p["record"]["i"] for p in json.loads(text)["patches"]] == [0, 2, 3]
    assert [p["file"] for p in json.loads(text)["patches"]] == [p.file for p in PatchStack.open(tmp_path).list()]
    while stack.list():
        stack.rollback(model, stack.top().id)
    assert json.loads(path.read_text()) == {"format_version": 1, "patches": []}
