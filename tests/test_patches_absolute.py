"""Absolute patches (a server's tensor push and gate edit set their tensors) under a rollback of a patch below
them: their values stand, where a relative patch (a fact edit) has its deltas replayed; old stacks on disk,
without the `absolute` field, are read by their records' methods."""

from __future__ import annotations

import json

import torch
from test_patches import A1, B1, G1, edit, fresh_model, same

from felix.patch_format import STACK_FILE
from felix.patches import PatchStack

GATE = {"method": "gate_bias"}
PUSH = {"method": "tensor_push"}


def test_rolling_back_a_lower_gate_edit_keeps_the_later_gate(tmp_path):
    """gate 1.5, then gate 0 (ablated), then the first rolled back: the replayed delta gave -0.5, a gate nobody
    set (the layer inverted, not ablated)."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    p1 = stack.apply(model, {G1: torch.tensor(1.5)}, GATE)
    stack.apply(model, {G1: torch.tensor(0.0)}, GATE)
    stack.rollback(model, p1.id)
    assert float(model.splice_state()[G1]) == 0.0
    assert stack.top().absolute and float(stack.top().before[G1]) == 1.0  # the rewritten history: 1 -> 0


def test_rolling_back_a_lower_push_keeps_the_later_push_bit_exact_across_a_restart(tmp_path):
    """push A1, push A2, roll back A1: the model held A0 + A2 - A1, not A2. The rewritten stack stays exact:
    restored after a reopen it holds A2, and rolling A2 back returns A0 bit for bit."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    s0 = model.splice_state()
    p1 = stack.apply(model, edit(model, [A1], 1), PUSH, absolute=True)
    a2 = edit(model, [A1], 2)
    p2 = stack.apply(model, a2, PUSH, absolute=True)
    stack.rollback(model, p1.id)
    assert torch.equal(model.splice_state()[A1], a2[A1])
    restarted, reopened = fresh_model(), PatchStack.open(tmp_path)
    reopened.restore(restarted)
    assert same(restarted.splice_state(), model.splice_state()) and reopened.top().absolute
    reopened.rollback(restarted, p2.id)
    assert same(restarted.splice_state(), s0)


def test_relative_patches_over_an_absolute_one_replay_their_deltas_in_stack_order(tmp_path):
    """A fact edit after a push moves the pushed tensor: rolling back the push replays the edit's delta on
    the tensor below the push; a later push over both still stands as written."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    s0 = model.splice_state()
    push = stack.apply(model, edit(model, [A1, B1], 1), PUSH)
    fact = stack.apply(model, edit(model, [A1, B1], 2), {"method": "kl_train"})
    b3 = edit(model, [B1], 3)
    stack.apply(model, b3, PUSH)
    stack.rollback(model, push.id)
    now = model.splice_state()
    assert not fact.absolute
    assert torch.allclose(now[A1], s0[A1] + fact.deltas[A1], atol=1e-6)
    assert torch.equal(now[B1], b3[B1])


def test_a_stack_without_the_absolute_field_is_read_by_its_methods(tmp_path):
    """Stacks written before `absolute` existed: gate edits and pushes are absolute, fact edits relative."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    p1 = stack.apply(model, {G1: torch.tensor(1.5)}, GATE)
    stack.apply(model, {G1: torch.tensor(0.0)}, GATE)
    stack.apply(model, edit(model, [A1], 1), {"method": "closed_form_a"})
    path = tmp_path / "splices" / STACK_FILE
    doc = json.loads(path.read_text())
    assert [e.pop("absolute") for e in doc["patches"]] == [True, True, False]
    path.write_text(json.dumps(doc))
    old = PatchStack.open(tmp_path)
    assert [p.absolute for p in old.list()] == [True, True, False]
    restarted = fresh_model()
    old.restore(restarted)
    old.rollback(restarted, p1.id)
    assert float(restarted.splice_state()[G1]) == 0.0
    assert [p.absolute for p in PatchStack.open(tmp_path).list()] == [True, False]  # written back with the field
