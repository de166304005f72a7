"""A stopped splice bench continues from its progress file (felix.splice_bench_progress) to the figures of a bench
never stopped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from splice_helpers import counterfactual
from test_splice_prompts import KIND

import felix.splice_bench as splice_bench
from felix.errors import FelixError
from felix.heldout import HeldoutText
from felix.patches import PatchStack
from felix.prefix_memo import prefix_memo
from felix.splice_config import EditConfig
from felix.splice_data import stack_neutral
from felix.splice_edit import EditRequest, save_requests

PROMPTS = ["import os\nimport ", "def __init__(self", "import sys\nimport ", "class "]
NEUTRAL = ["if ", "for ", "x = ", "return ", "import re\nimport ", "while "]


def _requests(model, tok) -> list[EditRequest]:
    return [EditRequest(p, tok.decode(list(counterfactual(model, tok, p, rank=1).target)), [" " + p],
                        NEUTRAL[i: i + 3], id=f"e{i}") for i, p in enumerate(PROMPTS)]


def _stop_at(monkeypatch, step: int, before_save: bool) -> None:
    """Interrupt the bench at `step`, just before its progress is written or just after."""
    save = splice_bench.save_progress

    def stopping(path, identity, progress):
        if before_save and progress.step == step:
            raise KeyboardInterrupt
        save(path, identity, progress)
        if progress.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(splice_bench, "save_progress", stopping)


def _same(a: dict, b: dict) -> None:
    a, b = json.loads(json.dumps(a, default=str)), json.loads(json.dumps(b, default=str))
    a["final"].pop("seconds"), b["final"].pop("seconds")
    assert a == b


@pytest.mark.parametrize("before_save", [False, True], ids=["after-save", "before-save"])
def test_a_stopped_bench_resumes_to_the_figures_of_one_never_stopped(tiny_wide, tmp_path, monkeypatch, before_save):
    model, tok, _, heldout, preserve = tiny_wide
    requests = _requests(model, tok)
    # preservation prompts kept along two greedy tokens: their second tokens are read once, before any edit
    cfg = EditConfig("closed_form_a", layers=[3], max_ppl_increase=10, max_neutral_kl=10, prompt_tokens=2)
    prompts = [tok.encode(p) for p in KIND[:40]]

    def bench(name: str, **kw) -> dict:
        return splice_bench.run_bench(model, tok, requests, 4, cfg, HeldoutText.of(heldout), preserve,
                                      stack_dir=tmp_path / name, circuit_every=2, heldout_neutral=True,
                                      preserve_prompts=prompts, progress=tmp_path / f"{name}.progress", **kw)

    whole = bench("whole")
    assert whole["final"]["applied"] >= 3, whole["final"]["rejections"]
    with monkeypatch.context() as m:
        _stop_at(m, 3, before_save)
        with pytest.raises(KeyboardInterrupt):
            bench("stopped")
    state0 = model.splice_state()
    stack = PatchStack.open(tmp_path / "stopped")
    # stopped before step 3 was recorded, its patch (when accepted) is on the stack all the same
    assert len(stack) == sum(s["accepted"] for s in whole["steps"][:3])
    resumed = bench("stopped", resume=True)
    _same(whole, resumed)
    assert all(torch.equal(v, model.splice_state()[k]) for k, v in state0.items())  # the caller's model untouched
    ends = [PatchStack.open(tmp_path / n) for n in ("whole", "stopped")]
    # the records keep the neutral prompts each edit saw: the held-out half (every other one) never reaches a
    # later --protect-suite
    pool = list(dict.fromkeys(p for r in requests for p in r.neutral))
    held = set(pool[1::2])
    by_id = {r.id: r for r in requests}
    for patch in ends[0].list():
        req = patch.record["request"]
        assert req["neutral"] == [p for p in by_id[req["id"]].neutral if p not in held]
    assert held and held.isdisjoint(stack_neutral(ends[0]))
    assert [p.record["request"]["id"] for p in ends[0].list()] == [p.record["request"]["id"] for p in ends[1].list()]
    for a, b in zip(ends[0].list(), ends[1].list(), strict=True):
        assert all(torch.equal(a.after[k], b.after[k]) for k in a.after)


def _stopped_after_one_edit(tiny, progress, monkeypatch) -> tuple[list[EditRequest], EditConfig]:
    """A two-edit kl_train bench stopped after its first edit, its progress in `progress`: (requests, config)."""
    model, tok, _, heldout, preserve = tiny
    requests = _requests(model, tok)[:2]
    cfg = EditConfig("kl_train", layers=[3], steps=5, lr=0.03, max_ppl_increase=10, max_neutral_kl=10)
    with monkeypatch.context() as m:
        _stop_at(m, 1, before_save=False)
        with pytest.raises(KeyboardInterrupt):
            splice_bench.run_bench(model, tok, requests, 2, cfg, HeldoutText.of(heldout), preserve, progress=progress)
    return requests, cfg


def test_a_resume_with_other_inputs_is_refused_naming_them(tiny, tmp_path, monkeypatch):
    model, tok, _, heldout, preserve = tiny
    progress = tmp_path / "p.safetensors"
    requests, cfg = _stopped_after_one_edit(tiny, progress, monkeypatch)
    other = EditConfig("kl_train", layers=[3], steps=6, lr=0.03, max_ppl_increase=10, max_neutral_kl=10)
    with pytest.raises(FelixError, match=r"config\.steps was 5, now 6"):
        splice_bench.run_bench(model, tok, requests, 2, other, HeldoutText.of(heldout), preserve, progress=progress,
                               resume=True)
    with pytest.raises(FelixError, match="requests differ"):
        splice_bench.run_bench(model, tok, requests[::-1], 2, cfg, HeldoutText.of(heldout), preserve,
                               progress=progress, resume=True)
    with pytest.raises(FelixError, match="kept was None, now"):  # a stack kept now was not kept then
        splice_bench.run_bench(model, tok, requests, 2, cfg, HeldoutText.of(heldout), preserve, progress=progress,
                               resume=True, stack_dir=tmp_path / "kept")
    # another device's kernels give other floats: a bench started on a GPU does not continue on the CPU
    _rewrite_identity(progress, device="cuda")
    with pytest.raises(FelixError, match="device was 'cuda', now 'cpu'"):
        splice_bench.run_bench(model, tok, requests, 2, cfg, HeldoutText.of(heldout), preserve, progress=progress,
                               resume=True)
    progress.write_bytes(b"\x00" * 20)
    with pytest.raises(FelixError, match="not a readable bench progress file"):
        splice_bench.run_bench(model, tok, requests, 2, cfg, HeldoutText.of(heldout), preserve, progress=progress,
                               resume=True)


def _rewrite_identity(path, **changes) -> None:
    """The progress file at `path` with these identity keys set (None: removed), as another run would have left it."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    identity = json.loads(meta["identity"])
    identity |= changes
    identity = {k: v for k, v in identity.items() if v is not None}
    save_file(tensors, str(path), metadata=meta | {"identity": json.dumps(identity)})


def test_a_bench_started_before_the_device_was_recorded_resumes_on_the_cpu(tiny, tmp_path, monkeypatch):
    model, tok, _, heldout, preserve = tiny
    progress = tmp_path / "p.safetensors"
    requests, cfg = _stopped_after_one_edit(tiny, progress, monkeypatch)
    _rewrite_identity(progress, device=None)
    result = splice_bench.run_bench(model, tok, requests, 2, cfg, HeldoutText.of(heldout), preserve,
                                    progress=progress, resume=True)
    assert [row["step"] for row in result["steps"]] == [1, 2]


def _main(capsys, *args: str) -> tuple[int, str, str]:
    from felix.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_bench_resume(tiny, capsys, tmp_path, monkeypatch):
    model, tok, ckpt, *_ = tiny
    save_requests(tmp_path / "e.jsonl", _requests(model, tok)[:3])
    args = ["splice", "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "e.jsonl"), "--n", "3",
            "--layers", "3", "--method", "kl_train", "--steps", "10", "--lr", "0.03", "--max-ppl-increase", "1",
            "--max-neutral-kl", "10", "--json"]
    rc, whole, err = _main(capsys, *args, "--out", str(tmp_path / "whole"))
    # the ETA is timed from the first step's end, which also paid for the bench's setup
    etas = [line.split("ETA ")[1] for line in err.splitlines() if line.startswith("step")]
    assert etas[0] == "after the next step]" and etas[-1] == "0.0 min]", err
    assert rc == 0 and not (tmp_path / "whole" / "bench-progress.safetensors").exists()  # gone once it is done
    out = str(tmp_path / "b")
    with monkeypatch.context() as m:
        _stop_at(m, 2, before_save=False)
        m.setattr("sys.argv", ["felix", *args, "--out", out])
        rc, _, err = _main(capsys, *args, "--out", out)
    assert rc == 130 and err.rstrip().endswith("stopped by SIGINT")
    assert f"continue it with: felix {' '.join(args)} --out {out} --resume" in err
    rc, _, err = _main(capsys, *args, "--out", out)  # not without --resume
    assert rc == 2 and "holds an unfinished bench" in err
    rc, _, err = _main(capsys, *args, "--resume")
    assert rc == 2 and "--resume needs --out" in err
    rc, resumed, err = _main(capsys, *args, "--out", out, "--resume")
    assert rc == 0, err
    assert [line.split()[1] for line in err.splitlines() if line.startswith("step")] == ["3/3"]
    whole, resumed = (json.loads(o.strip().splitlines()[-1]) for o in (whole, resumed))
    for r in (whole, resumed):
        r.pop("seconds"), r.pop("plot")
    assert whole == resumed
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert bench["final"]["seconds"] > 0 and not (tmp_path / "b" / "bench-progress.safetensors").exists()
    rc, _, err = _main(capsys, *args, "--out", out, "--resume")
    assert rc == 2 and "no unfinished bench here" in err


def test_the_prefix_memo_gives_the_figures_and_patches_of_full_forwards(tiny_wide, tmp_path):
    """The bench runs its windows and prompts from the lowest edited block on (felix.prefix_memo): every figure
    and every patch is bitwise what full forwards give."""
    model, tok, _, heldout, preserve = tiny_wide
    requests = _requests(model, tok)
    cfg = EditConfig("closed_form_a", layers=[3], max_ppl_increase=10, max_neutral_kl=10)

    def bench(run, name: str) -> dict:
        return run(model, tok, requests, 4, cfg, HeldoutText.of(heldout), preserve, stack_dir=tmp_path / name,
                   circuit_every=2, heldout_neutral=True)

    with prefix_memo(model) as memo:
        memoized = bench(splice_bench.run_bench, "memo")
    full = bench(splice_bench.run_bench.__wrapped__, "full")
    assert memoized["final"]["applied"] >= 3 and memo.hits > 0
    _same(memoized, full)
    ends = [PatchStack.open(tmp_path / n).list() for n in ("memo", "full")]
    for a, b in zip(*ends, strict=True):
        assert all(torch.equal(a.after[k], b.after[k]) for k in a.after)
