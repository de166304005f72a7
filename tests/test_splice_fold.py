"""The fold of an artifact's unrounded stack: computed bottom up in one pass over the text, stored beside
the stack under a digest of its inputs, and read back by every loader only when that digest matches."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch
from splice_helpers import cli_json, counterfactual, train_tiny

from felix.cli import main
from felix.model_loader import load_model
from felix.patch_format import FOLD_FILE, SPLICES_DIR
from felix.patches import PatchStack
from felix.splice_data import preservation_windows, stack_edits
from felix.splice_fold import FOLD_ENTRIES, StackFold, fold_digest
from felix.splice_quant import gptq_requantizer


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_mix):
    """An RQ4 artifact of a rank-16 tiny checkpoint with two fact edits applied to it by the CLI."""
    from felix.splice_edit import EditRequest, save_requests

    tmp = tmp_path_factory.mktemp("fold")
    ckpt = train_tiny(tmp, tiny_mix, splice_rank=16)
    art = tmp / "art"
    assert main(["quantize", "--checkpoint", str(ckpt), "--format", "rq4", "--out", str(art)]) == 0
    model, tok, _ = load_model(art)
    exs = [counterfactual(model, tok, start, rank=1) for start in ("return ", "import ")]
    save_requests(tmp / "edits.jsonl", [EditRequest(tok.decode(e.ids[: e.n_prompt]), tok.decode(e.target))
                                        for e in exs])
    assert main(["splice", "apply", "--checkpoint", str(art), "--edits", str(tmp / "edits.jsonl"),
                 "--layers", "1,3", "--max-ppl-increase", "1", "--max-neutral-kl", "10"]) in (0, 1)
    assert len(PatchStack.open(art)) >= 1
    return art


def _fresh_fold(art) -> dict[str, torch.Tensor]:
    """The stack's fold computed here, independently of any store."""
    model, tok, ckpt = load_model(art)
    stack = PatchStack.open(art)
    stack.restore(model)
    gptq_requantizer(preservation_windows(ckpt, model), stack_edits(stack, tok, 64), "rq4")(model)
    return model.splice_state()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _push_body(name: str, tensor: torch.Tensor) -> dict:
    """A `POST /api/v1/splice/tensor` body: `tensor` as little-endian float32, base64."""
    import base64

    data = tensor.float().contiguous().numpy().astype("<f4").tobytes()
    return {"name": name, "data": base64.b64encode(data).decode()}


def _stored(art) -> StackFold:
    model, _, ckpt = load_model(art)
    return StackFold.of_checkpoint(ckpt, model)


def _stored_digest(art) -> str:
    """The digest of the fold recorded last."""
    return _stored(art).stored_digests()[0]


def test_bottom_up_covariances_are_input_covariance_bit_for_bit(tiny_wide):
    from felix.splice_covariance import BottomUpCovariances, input_covariance

    model, preserve = copy.deepcopy(tiny_wide[0]), tiny_wide[4]
    walk = BottomUpCovariances(model, preserve)
    for layer in sorted(model.splice_cores()):
        assert torch.equal(walk.covariance(layer), input_covariance(model, [layer], preserve)[layer])
        core = model.splice_cores()[layer]
        with torch.no_grad():  # what a fold does: the next layer must see this one rewritten
            core.b.add_(0.05 * torch.randn_like(core.b))
            core.a.add_(0.05 * torch.randn_like(core.a))
    with pytest.raises(ValueError, match="already passed"):
        walk.covariance(min(model.splice_cores()))
    # the streams a recording walk keeps are the plain walk's, bit for bit
    layers = sorted(model.splice_cores())
    recording = BottomUpCovariances(model, preserve, record=True)
    for layer in layers:
        recording.covariance(layer)
    streams = BottomUpCovariances(model, preserve).streams(layers)
    assert streams.keys() == recording.entering.keys()
    assert all(torch.equal(x, y) for L in layers for x, y in zip(streams[L], recording.entering[L], strict=True))


def test_apply_stores_the_fold_it_judged_and_loaders_read_it(artifact):
    store = artifact / SPLICES_DIR / FOLD_FILE
    assert store.is_file()
    model, tok, ckpt = load_model(artifact)
    stack = PatchStack.open(artifact)
    stack.restore(model)
    fold = StackFold.of_checkpoint(ckpt, model)
    digest = fold.digest(model, stack_edits(stack, tok, 64))
    stored = fold._read(digest)
    assert _stored_digest(artifact) == digest
    assert _same(stored, _fresh_fold(artifact))  # what apply judged is the stack's fold
    # a loader serves what the store holds when the digest matches: change a stored value, keep the digest
    name = "layers.3.mlp.splice.b"
    marked = dict(stored, **{name: stored[name] * 2})
    original = store.read_bytes()
    try:
        fold.record(digest, marked)
        served, _, _ = load_model(artifact, splices=True)
        assert torch.equal(served.splice_state()[name], marked[name])
    finally:
        store.write_bytes(original)


def test_a_stale_or_unreadable_store_is_folded_again_and_rewritten(artifact, tmp_path, capsys, caplog):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    store = art / SPLICES_DIR / FOLD_FILE
    fold = _stored(art)
    before = fold.stored_digests()
    assert len(PatchStack.open(art)) == 2 and len(before) == 2  # apply recorded the fold of each stack it judged
    # a store holding only another stack's fold: cut to the two-edit stack's, then the top edit rolled back
    top = fold._read(before[0])
    store.unlink()
    fold.record(before[0], top)
    assert cli_json(capsys, "splice", "rollback", "--checkpoint", str(art))[0] == 0
    served, _, _ = load_model(art, splices=True)
    assert _same(served.splice_state(), _fresh_fold(art))
    assert _stored(art).stored_digests() == [before[1], before[0]]  # folded again, under the digest apply used
    store.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="felix.splice_fold"):
        served, _, _ = load_model(art, splices=True)
    assert "unreadable stored fold" in caplog.text
    assert _same(served.splice_state(), _fresh_fold(art)) and len(_stored(art).stored_digests()) == 1
    assert _same(_stored(art)._read(_stored_digest(art)), served.splice_state())
    # the stack's own housekeeping keeps the store: it is not a stray patch file
    PatchStack.open(art)
    assert store.is_file()


def test_a_rollback_is_served_from_the_store_without_folding(artifact, tmp_path, capsys, monkeypatch):
    """The store keeps the last stacks' folds, so a rollback serves the fold apply judged for the stack it
    returns to, bit for bit, and folds nothing (a fold here would fail); the store keeps FOLD_ENTRIES."""
    import felix.splice_fold as sf

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    assert cli_json(capsys, "splice", "rollback", "--checkpoint", str(art))[0] == 0
    expected = _fresh_fold(art)

    def no_fold(*_a, **_k):
        raise AssertionError("folded although the store holds this stack's fold")

    monkeypatch.setattr(sf, "gptq_requantizer", no_fold)
    served, _, _ = load_model(art, splices=True)
    assert _same(served.splice_state(), expected)
    fold = _stored(art)
    first = fold.stored_digests()
    for i in range(FOLD_ENTRIES + 2):  # the oldest fall out, the newest first
        fold.record(f"d{i}", expected)
    assert fold.stored_digests() == [f"d{i}" for i in reversed(range(2, FOLD_ENTRIES + 2))]
    assert not set(first) & set(fold.stored_digests())
    fold.record("d5", expected)  # recording a stored digest again moves it first, once
    assert fold.stored_digests()[:2] == ["d5", f"d{FOLD_ENTRIES + 1}"] and len(fold.stored_digests()) == FOLD_ENTRIES


def test_the_fold_digest_covers_every_input(artifact):
    model, tok, ckpt = load_model(artifact)
    stack = PatchStack.open(artifact)
    stack.restore(model)
    edits = stack_edits(stack, tok, 64)
    preserve = preservation_windows(ckpt, model)
    base = fold_digest(model, edits, preserve, "rq4", 0.5)
    again, _, _ = load_model(artifact)
    stack.restore(again)
    assert fold_digest(again, edits, preserve, "rq4", 0.5) == base  # a fresh load: the same inputs
    assert fold_digest(model, edits[:-1], preserve, "rq4", 0.5) != base
    assert fold_digest(model, edits, preserve[:-1], "rq4", 0.5) != base
    assert fold_digest(model, edits, preserve, "nf4", 0.5) != base
    assert fold_digest(model, edits, preserve, "rq4", 0.25) != base
    weight = model.layers[0].mlp.up_proj.weight  # a base weight, one ulp off
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    assert fold_digest(model, edits, preserve, "rq4", 0.5) != base


def test_completions_go_on_while_a_server_folds_a_push(artifact, tmp_path, monkeypatch):
    """A push's fold runs on the server's twin: a completion asked for mid-fold is answered from the state
    served before the push, and once the push returns the model serves the new stack's fold."""
    import threading

    import felix.splice_fold as sf
    from felix.server_api import SpliceService

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    service = SpliceService.load(art)
    before, patches = service.model.splice_state(), service.status()["patches"]
    ask = {"prompt": "import ", "max_tokens": 6}
    answer = service.complete(ask)["content"]
    folding, release = threading.Event(), threading.Event()
    real = sf.gptq_requantizer

    def held(*args, **kwargs):  # the real fold, held until the test has completed mid-fold
        fold = real(*args, **kwargs)

        def apply(model, *a, **k):
            folding.set()
            assert release.wait(120)
            return fold(model, *a, **k)

        return apply

    monkeypatch.setattr(sf, "gptq_requantizer", held)
    name = "layers.3.mlp.splice.a"
    body = _push_body(name, PatchStack.open(art).top().after.get(name, before[name]) * 1.01 + 1e-3)
    out: dict = {}
    push = threading.Thread(target=lambda: out.update(service.push_tensor(body)), daemon=True)
    push.start()
    try:
        assert folding.wait(120)
        mid: dict = {}
        reader = threading.Thread(target=lambda: mid.update(service.complete(ask)), daemon=True)
        reader.start()
        reader.join(60)
        assert mid.get("content") == answer  # answered while the fold is held, from the state before the push
        assert _same(service.model.splice_state(), before) and service.status()["patches"] == patches
    finally:
        release.set()
        push.join(120)
    assert out["status"] == "ok" and len(service.status()["patches"]) == len(patches) + 1
    monkeypatch.setattr(sf, "gptq_requantizer", real)
    assert _same(service.model.splice_state(), _fresh_fold(art))


def _push(service, name: str, scale: float) -> None:
    tensor = service.twin.splice_state()[name] * scale + 1e-3
    assert service.push_tensor(_push_body(name, tensor))["status"] == "ok"


def test_a_push_is_folded_from_its_layer_up_bit_for_bit(artifact, tmp_path):
    """A server's fold after a push resumes its last fold at the pushed layer, and serves bit for bit the
    whole fold of the new stack; a change below a layer, or to the edits, folds from there or whole. The fold
    it started with, read from the store, is resumed too: the stream entering the layer is walked up to."""
    from felix.server_api import SpliceService

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    service = SpliceService.load(art)  # served from the store (folded here, by `felix splice apply`)
    assert service.fold.resumed_from is None and not service.fold._trace.entering
    _push(service, "layers.3.mlp.splice.b", 1.02)
    assert service.fold.resumed_from == 3 and _same(service.model.splice_state(), _fresh_fold(art))
    _push(service, "layers.3.mlp.splice.a", 1.01)
    assert service.fold.resumed_from == 3 and _same(service.model.splice_state(), _fresh_fold(art))
    _push(service, "layers.1.mlp.splice.a", 0.99)  # nothing below layer 1 changed: blocks 0..0 skipped
    assert service.fold.resumed_from == 1 and _same(service.model.splice_state(), _fresh_fold(art))

    fold, twin = service.fold, service.twin
    edits = stack_edits(service.stack, service.tok, 64)
    unrounded = twin.splice_state()
    fold.served(twin, edits[:-1])  # other edit keys weigh every layer's rounding: a whole fold
    assert fold.resumed_from is None and _same(twin.splice_state(), unrounded)
    with torch.no_grad():
        twin.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # a base weight below every SpliceCore layer
    expected = copy.deepcopy(twin)
    gptq_requantizer(fold.preserve, edits[:-1], "rq4")(expected)
    assert _same(fold.served(twin, edits[:-1]), expected.splice_state()) and fold.resumed_from is None
