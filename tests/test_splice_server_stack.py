"""`felix serve` and its patch stack: a rollback below a push or gate edit leaves the later write's values (they
are absolute); the server holds the stack's write lock for its life, so a CLI write to its checkpoint is refused
naming it, and a stack changed behind its back anyway is a 409 saying to restart, not a 500; an fp32 checkpoint
served as rq4 serves its trained SpliceCore as `felix quantize` stores it and rounds pushes by GPTQ (auto),
folding only when the stack holds unrounded edits. Real servers (the tiny model of test_splice_server), real HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_splice_server import B1, TOKEN, base_ckpt, call, f32, running  # noqa: F401 (shared fixture)
from test_trainer_lock import held_elsewhere

from felix.cli import main
from felix.errors import FelixError
from felix.model_loader import load_model
from felix.patch_format import FOLD_FILE, SPLICES_DIR
from felix.patches import PatchStack
from felix.server_api import SpliceService
from felix.server_common import ApiError
from felix.splice_quant import on_grid, requantize_splice


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:  # noqa: F811 (the fixture's name)
    """A private copy: patches are saved beside the checkpoint."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


def write(server, path: str, body: dict) -> tuple[int, dict]:
    return call(server, path, body, token=TOKEN)


# -- absolute writes under a rollback below them ---------------------------------------------------
def test_rolling_back_a_lower_gate_edit_leaves_the_later_gate(ckpt):
    """bias 0.5, then bias -1 (ablated), then the first rolled back: the layer was served with gate -0.5."""
    with running(ckpt) as server:
        first = write(server, "/api/v1/splice/edit", {"gate_biases": {"3": 0.5}})[1]["patch_id"]
        assert write(server, "/api/v1/splice/edit", {"gate_biases": {"3": -1}})[0] == 200
        assert write(server, "/api/v1/splice/rollback", {"patch_id": first})[0] == 200
        layer = call(server, "/api/v1/splice/status")[1]["layers"]["3"]
        assert (layer["gate"], layer["gate_bias"], layer["delta_norm"]) == (0.0, -1.0, 0.0)


def test_rolling_back_a_lower_push_leaves_the_later_push_bit_exact_across_a_restart(ckpt):
    """push B1 = X1, push X2, roll back the X1 push: the server held B0 + X2 - X1."""
    rng = np.random.default_rng(3)
    x1, x2 = (rng.normal(0, 0.5, size=(32, 4)).astype(np.float32) for _ in range(2))
    with running(ckpt) as server:
        first = write(server, "/api/v1/splice/tensor", {"name": B1, "data": f32(x1)})[1]["patch_id"]
        assert write(server, "/api/v1/splice/tensor", {"name": B1, "data": f32(x2)})[0] == 200
        assert write(server, "/api/v1/splice/rollback", {"patch_id": first})[0] == 200
        assert torch.equal(server.service.model.splice_state()[B1], torch.from_numpy(x2))
        status = call(server, "/api/v1/splice/status")[1]
    with running(ckpt) as server:  # restart: the same, and rolling the push back returns the trained B1
        assert call(server, "/api/v1/splice/status")[1] == status
        assert write(server, "/api/v1/splice/rollback", {})[0] == 200
        assert torch.equal(server.service.model.splice_state()[B1], load_model(ckpt)[0].splice_state()[B1])


# -- one writer: the server holds the stack ----------------------------------------------------------
def test_a_cli_write_to_a_served_checkpoint_is_refused_naming_the_server(ckpt):
    """`felix splice rollback` beside a server went through, after which every server write failed (500) and
    status went on reporting the removed patch."""
    with running(ckpt) as server:
        pid = write(server, "/api/v1/splice/edit", {"gate_biases": {"1": 0.5}})[1]["patch_id"]
        cli = subprocess.run([sys.executable, "-m", "felix", "splice", "rollback", "--checkpoint", str(ckpt)],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2, cli.stderr
        assert f"(felix serve, pid {os.getpid()} on {socket.gethostname()}, per " in cli.stderr
        assert "write through its API" in cli.stderr and "or stop it" in cli.stderr
        assert [p.id for p in PatchStack.open(ckpt).list()] == [pid]
        assert write(server, "/api/v1/splice/edit", {"gate_biases": {"1": -0.5}})[0] == 200
        assert write(server, "/api/v1/splice/rollback", {})[0] == 200
        assert [p["id"] for p in call(server, "/api/v1/splice/status")[1]["patches"]] == [pid]


def test_a_closed_service_lets_go_of_the_stack_and_refuses_writes(ckpt):
    """Before, nothing let go of the lock but the service's garbage collection: a `felix splice apply` beside a
    server stopped in-process was refused as if it still served."""
    with SpliceService.load(ckpt) as service:
        pid = service.edit_gates({"gate_biases": {"1": 0.5}})["patch_id"]
    cli = subprocess.run([sys.executable, "-m", "felix", "splice", "apply", "--checkpoint", str(ckpt), "--prompt",
                          "seven wizards", "--target", " jolly"], capture_output=True, text=True, timeout=300)
    # past the lock, which it takes first: stopped only by what this tiny checkpoint lacks, its training text
    assert "holds this checkpoint's patch stack" not in cli.stderr and "names no data mix" in cli.stderr, cli.stderr
    for fn, body in ((service.edit_gates, {"gate_biases": {"1": -0.5}}), (service.rollback, {})):
        with pytest.raises(ApiError) as refused:  # it holds the stack no more: another process may write it
            fn(body)
        assert (refused.value.status, refused.value.code) == (503, "SHUTTING_DOWN")
    assert [p.id for p in PatchStack.open(ckpt).list()] == [pid]
    assert [p["id"] for p in service.status()["patches"]] == [pid]  # reads go on
    service.close()  # again: nothing


def test_a_server_does_not_start_on_a_stack_another_process_is_writing(ckpt):
    with held_elsewhere(ckpt / SPLICES_DIR) as holder, \
            pytest.raises(FelixError, match=rf"patch stack \(pid {holder.pid} on "):
        SpliceService.load(ckpt)


def test_a_bench_keeping_its_patches_holds_that_stack(tiny_wide, tmp_path, capsys):
    """`bench --keep-patches DIR` writes DIR's stack for its whole run, as `apply` writes a checkpoint's."""
    from felix.splice_edit import EditRequest, save_requests

    save_requests(tmp_path / "edits.jsonl", [EditRequest("import ", "os")])
    kept = tmp_path / "kept"
    with held_elsewhere(kept / SPLICES_DIR) as holder:
        capsys.readouterr()
        assert main(["splice", "bench", "--checkpoint", str(tiny_wide[2].path), "--edits",
                     str(tmp_path / "edits.jsonl"), "--n", "1", "--keep-patches", str(kept)]) == 2
        assert f"holds this checkpoint's patch stack (pid {holder.pid} on " in capsys.readouterr().err
    assert not (kept / SPLICES_DIR / "stack.json").exists()


def test_a_stack_changed_behind_the_servers_back_is_a_409_saying_to_restart(ckpt):
    """Written anyway (a tool that takes no lock): each server write was a 500 SPLICE_TENSOR_ERROR."""
    with running(ckpt) as server:
        assert write(server, "/api/v1/splice/edit", {"gate_biases": {"1": 0.5}})[0] == 200
        other = load_model(ckpt)[0]
        PatchStack.open(ckpt).rollback(other, PatchStack.open(ckpt).top().id)
        for path, body in (("/api/v1/splice/edit", {"gate_biases": {"3": 0.25}}), ("/api/v1/splice/rollback", {})):
            status, out = write(server, path, body)
            assert (status, out["code"]) == (409, "SPLICE_STACK_CHANGED"), out
            assert "restart felix serve" in out["error"]
        assert len(call(server, "/api/v1/splice/status")[1]["patches"]) == 1  # nothing applied


# -- an fp32 checkpoint served as rq4 ----------------------------------------------------------------
def test_an_fp32_checkpoint_served_as_rq4_is_rounded_as_quantize_stores_it(tiny_wide, tmp_path, capsys):
    """No patches, so nothing unrounded: auto folded the trained SpliceCore (and failed to store the fold in a
    splices/ that did not exist) and gptq/plain were refused for 'unrounded edits' that did not exist."""
    ckpt = Path(shutil.copytree(tiny_wide[2].path, tmp_path / "ckpt"))
    art = tmp_path / "art"
    assert main(["quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(art)]) == 0
    quantized = load_model(art)[0].splice_state()
    trained = load_model(ckpt)[0].splice_state()
    assert not on_grid(trained, "rq4")
    a = "layers.1.mlp.splice.a"
    for rounding, expected in (("auto", "gptq"), ("gptq", "gptq"), ("plain", "plain")):
        with SpliceService.load(ckpt, quant_format="rq4", push_rounding=rounding) as service:
            assert service.push_rounding_name == expected and service.fold is None
            served = service.model.splice_state()
            assert all(torch.equal(served[k], quantized[k]) for k in trained)  # what `felix quantize` packs
            if rounding == "plain":
                assert service.push_tensor({"name": a, "data": f32(trained[a].numpy() * 1.5)})["status"] == "ok"
                assert on_grid(service.model.splice_state(), "rq4")
    assert not (ckpt / SPLICES_DIR / FOLD_FILE).exists()
    with SpliceService.load(ckpt, quant_format="rq4") as service:
        assert service.push_rounding_name == "gptq"  # an on-grid push: no fold


def test_an_fp32_stack_with_unrounded_writes_served_as_rq4_is_folded(tiny_wide, tmp_path):
    """What decides the fold is the stack's writes: an fp32 server's push is off the grid."""
    ckpt = Path(shutil.copytree(tiny_wide[2].path, tmp_path / "ckpt"))
    a = "layers.3.mlp.splice.a"
    with SpliceService.load(ckpt) as fp32:
        pushed = fp32.model.splice_state()[a] * 1.5
        assert fp32.push_tensor({"name": a, "data": f32(pushed.numpy())})["status"] == "ok"
    assert not torch.equal(requantize_splice(a, pushed, "rq4"), pushed)
    with SpliceService.load(ckpt, quant_format="rq4") as service:
        assert service.push_rounding_name == "fold"
    for rounding in ("gptq", "plain"):
        with pytest.raises(FelixError, match="holds unrounded edits"):
            SpliceService.load(ckpt, quant_format="rq4", push_rounding=rounding)
