"""Patch stack and budget edge cases: rollback exactness across restarts, concurrent writers and readers,
NaN metrics in the budget."""

from __future__ import annotations

import threading

import torch
from test_patches import A1, B1, B3, edit, fresh_model, same

import felix.patch_format
from felix import splice_edit
from felix.errors import FelixError
from felix.heldout import HeldoutText
from felix.patches import PatchStack
from felix.splice_config import EditConfig, EditContext
from felix.splice_edit import propose_edit
from felix.splice_examples import Example


def _middle_rollbacks(tmp_path, restart: bool) -> dict[str, torch.Tensor]:
    """Three patches of the same tensor; roll back the first, (restart,) then the second."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    ids = [stack.apply(model, edit(model, [B1], seed), {}).id for seed in (1, 2, 3)]
    stack.rollback(model, ids[0])
    if restart:
        model, stack = fresh_model(), PatchStack.open(tmp_path)
        stack.restore(model)
    stack.rollback(model, ids[1])
    return model.splice_state()


def test_rollback_after_a_restart_equals_rollback_before_it(tmp_path):
    """A rolled-over patch kept its old deltas in memory while a reopen recomputed them from the rewritten
    files (after - before): rolling back the next patch then differed in the last bits."""
    assert same(_middle_rollbacks(tmp_path / "live", False), _middle_rollbacks(tmp_path / "restarted", True))


def test_rollback_keeps_later_writes_exact_where_the_removed_patch_changed_nothing(tmp_path):
    """A patch that rewrote B1 unchanged (with its A1 edit): rolling it back replayed the later patch's B1
    write as before + (after - before), which is not `after` in floating point."""
    model, stack = fresh_model(), PatchStack.open(tmp_path)
    g = torch.Generator().manual_seed(5)
    stack.apply(model, {B1: torch.randn(32, 4, generator=g)}, {})
    p1 = stack.apply(model, {A1: edit(model, [A1], 1)[A1], B1: model.splice_state()[B1]}, {})
    p2 = stack.apply(model, {B1: 0.01 * torch.randn(32, 4, generator=g)}, {})
    stack.rollback(model, p1.id)
    assert torch.equal(model.splice_state()[B1], p2.after[B1])
    assert torch.equal(stack.top().after[B1], p2.after[B1])


def test_concurrent_writers_are_refused_never_interleaved(tmp_path):
    """Two writers passing the stack.json check together each deleted the other's patch file as a stray:
    a stack.json naming a missing file (the checkpoint no longer loads) or a lost patch."""
    base = fresh_model()
    PatchStack.open(tmp_path).apply(base, edit(base, [A1], 0), {})
    for _ in range(6):
        stacks, models = [PatchStack.open(tmp_path) for _ in range(2)], [fresh_model() for _ in range(2)]
        for stack, model in zip(stacks, models, strict=True):
            stack.restore(model)
        start, results = threading.Barrier(2), [None, None]

        def write(i: int, stacks=stacks, models=models, start=start, results=results) -> None:
            start.wait()
            try:
                results[i] = stacks[i].apply(models[i], edit(models[i], [B1, B3], i + 1), {}).id
            except FelixError as exc:
                results[i] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        applied = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if isinstance(r, FelixError)]
        assert len(applied) == 1 and len(refused) == 1 and "another process" in str(refused[0])
        on_disk = PatchStack.open(tmp_path)  # loads: no patch file deleted under it
        assert [p.id for p in on_disk.list()][-1] == applied[0]
        on_disk.rollback(fresh_model(), applied[0])  # back to the one base patch for the next round


def test_open_during_a_rollback_that_deletes_patch_files_reads_the_new_stack(tmp_path, monkeypatch):
    """A reader (`felix generate` beside a serving writer) that read stack.json just before a writer's
    rollback rewrote the later patches' files failed with 'unreadable patch file'."""
    model, writer = fresh_model(), PatchStack.open(tmp_path)
    p1, p2, p3 = (writer.apply(model, edit(model, [B1], seed), {}) for seed in (1, 2, 3))
    real_load = felix.patch_format.load_file
    fired = []

    def writer_commits_first(path, *args, **kwargs):
        if not fired:
            fired.append(path)
            writer.rollback(model, p1.id)  # rewrites p2's and p3's files, deletes the ones just read
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(felix.patch_format, "load_file", writer_commits_first)
    reader = PatchStack.open(tmp_path)
    monkeypatch.undo()
    assert fired and [p.id for p in reader.list()] == [p2.id, p3.id]
    restarted = fresh_model()
    reader.restore(restarted)
    assert same(restarted.splice_state(), model.splice_state())


# -- the budget -------------------------------------------------------------------------------------


def _budget_case() -> tuple:
    model = fresh_model()
    g = torch.Generator().manual_seed(0)
    heldout = HeldoutText.of(torch.randint(0, 64, (4, 16), generator=g))
    ctx = EditContext(torch.randint(0, 64, (2, 16), generator=g), [[7, 8, 9]])
    return model, Example((1, 2, 3, 4, 5), 4), ctx, heldout


def test_budget_refuses_an_edit_whose_perplexity_and_kl_are_nan(monkeypatch):
    """Finite tensors that overflow the forward pass: NaN perplexity and KL compared False with their bounds,
    so the edit was accepted 'within budget' (and applied)."""
    model, ex, ctx, heldout = _budget_case()
    s0 = model.splice_state()
    overflowing = {A1: torch.full((4, 64), 1e20), B1: torch.full((32, 4), 1e20)}  # gate * b @ a: 6.4e41
    monkeypatch.setitem(splice_edit.METHODS, "kl_train", lambda *args: overflowing)
    out = propose_edit(model, ex, [1], ctx, heldout, EditConfig("kl_train", require_success=False))
    assert not out.accepted
    assert "held-out NLL is not a number" in out.reason and "neutral KL is not a number" in out.reason
    total = propose_edit(model, ex, [1], ctx, heldout,
                         EditConfig("kl_train", require_success=False, max_total_ppl_increase=0.02),
                         origin_nll=float("nan"))
    assert not total.accepted and "since the checkpoint is not a number" in total.reason
    assert same(model.splice_state(), s0)


def test_budget_refuses_a_method_that_wrote_nan_with_the_reason(monkeypatch):
    """A diverged method's NaN tensors raised ValueError out of propose_edit instead of a refusal."""
    model, ex, ctx, heldout = _budget_case()
    s0 = model.splice_state()
    monkeypatch.setitem(splice_edit.METHODS, "kl_train", lambda *args: {B1: torch.full((32, 4), float("nan"))})
    out = propose_edit(model, ex, [1], ctx, heldout, EditConfig("kl_train"))
    assert not out.accepted and "NaN or inf" in out.reason and B1 in out.reason
    assert out.metrics["success"] is False
    assert same(model.splice_state(), s0)


def test_budget_still_accepts_a_finite_edit_under_its_bounds(monkeypatch):
    model, ex, ctx, heldout = _budget_case()
    monkeypatch.setitem(splice_edit.METHODS, "kl_train", lambda *args: {B1: torch.zeros(32, 4)})  # b is 0: no-op
    out = propose_edit(model, ex, [1], ctx, heldout, EditConfig("kl_train", require_success=False),
                       origin_nll=float("nan"))
    assert out.accepted, out.reason  # an origin NLL without a total bound is reported, not judged
    assert out.metrics["ppl_increase"] == 0.0 and out.metrics["neutral_kl"] == 0.0


def test_a_request_without_neutral_prompts_reports_no_kl_rather_than_zero(monkeypatch):
    """Before, `neutral_kl` was 0.0 with nothing measured, which read as an edit proven to leave them alone."""
    model, ex, ctx, heldout = _budget_case()
    ctx = EditContext(ctx.preserve, [])
    moved = {B1: torch.full((32, 4), 1e-3)}  # a real change: the KL it would have on any prompt is not 0
    monkeypatch.setitem(splice_edit.METHODS, "kl_train", lambda *args: moved)
    out = propose_edit(model, ex, [1], ctx, heldout, EditConfig("kl_train", require_success=False))
    assert out.accepted, out.reason  # no KL to judge, and the bound is not applied to a missing one
    assert out.metrics["neutral_kl"] is None and out.metrics["ppl_increase"] != 0.0
