"""The `felix splice` command line on a tiny trained model: diagnose, apply, list, rollback, bench and
make-edits, with the patch stack they keep."""

from __future__ import annotations

import json
import math

import pytest
import torch
from splice_helpers import counterfactual  # noqa: E402

from felix.model_loader import load_model
from felix.splice_edit import EditRequest, save_requests
from felix.splice_examples import greedy_continuations, greedy_hits

# -- the command line, with the patch stack -------------------------------------------------------------


def _cli(capsys, *args: str, err: list[str] | None = None) -> tuple[int, dict]:
    """`felix splice ARGS --json`: its exit code and last stdout line; `err` collects its stderr lines."""
    from felix.cli import main

    capsys.readouterr()
    rc = main(["splice", *args, "--json"])
    out = capsys.readouterr()
    if err is not None:
        err += out.err.splitlines()
    return rc, json.loads(out.out.strip().splitlines()[-1])


def test_cli_diagnose_apply_list_rollback(tiny, capsys):
    model, tok, ckpt, *_ = tiny
    ex = counterfactual(model, tok)
    prompt, target = tok.decode(ex.ids[: ex.n_prompt]), tok.decode(ex.target)
    assert tok.encode(target) == list(ex.target)
    ck = str(ckpt.path)
    rc, d = _cli(capsys, "diagnose", "--checkpoint", ck, "--prompt", prompt, "--target", target)
    assert rc == 0 and len(d["logit_lens"]) == 4 and d["chosen_layers"]
    loose = ["--method", "kl_train", "--steps", "40", "--lr", "0.03", "--max-ppl-increase", "1",
             "--max-neutral-kl", "10", "--layers", "3"]
    rc, out = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, "--neutral", "import ",
                   *loose)
    assert rc == 0 and out["applied"] == 1 and out["results"][0]["metrics"]["success"]
    rc, listed = _cli(capsys, "list", "--checkpoint", ck)
    assert [p["id"] for p in listed["patches"]] == [out["results"][0]["patch_id"]]
    record = listed["patches"][0]["record"]
    assert record["request"]["target"] == target
    assert record["config"]["method"] == "kl_train" and record["config"]["steps"] == 40
    assert record["inputs"] == {"preserve_windows": 256, "heldout_windows": 128}  # no preservation prompts
    # a restart: a freshly loaded model plus the saved stack holds the edit
    from felix.patches import PatchStack

    fresh, _, _ = load_model(ck)
    PatchStack.open(ckpt.path).restore(fresh)
    assert greedy_hits(fresh, [ex]) == [True]
    # an edit over budget is refused with its reason, and nothing is written
    rc, bad = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", "return ", "--target", target,
                   "--max-ppl-increase", "-1")
    assert rc == 1 and bad["rejected"] == 1 and "perplexity" in bad["results"][0]["reason"]
    assert len(PatchStack.open(ckpt.path).list()) == 1
    # the total budget counts from the checkpoint, so the patch already applied counts against it
    rc, over = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", prompt, "--target", target, *loose,
                    "--max-total-ppl-increase", "-1")
    assert rc == 1 and "since the checkpoint" in over["results"][0]["reason"]
    assert over["results"][0]["metrics"]["total_ppl_increase"] != over["results"][0]["metrics"]["ppl_increase"]
    assert len(PatchStack.open(ckpt.path).list()) == 1
    rc, rb = _cli(capsys, "rollback", "--checkpoint", ck)
    assert rc == 0 and rb["remaining"] == []
    again, _, _ = load_model(ck)
    PatchStack.open(ckpt.path).restore(again)
    assert all(torch.equal(v, model.splice_state()[k]) for k, v in again.splice_state().items())


@pytest.mark.parametrize("flag, value", [("--margin", "0"), ("--margin", "-1"), ("--neutral-tokens", "0"),
                                         ("--heldout-windows", "0"), ("--preserve-windows", "-4"),
                                         ("--context-keys", "-1"), ("--repair-drop", "0.5")])
def test_cli_rejects_bad_method_values_by_name(tiny, capsys, flag, value):
    from felix.cli import main
    from felix.patches import PatchStack

    _, _, ckpt, *_ = tiny
    before = len(PatchStack.open(ckpt.path).list())
    capsys.readouterr()
    rc = main(["splice", "apply", "--checkpoint", str(ckpt.path), "--prompt", "def ", "--target", " f", flag, value])
    assert rc != 0 and flag in capsys.readouterr().err
    assert len(PatchStack.open(ckpt.path).list()) == before


def test_cli_apply_protect_suite_keeps_earlier_neutral_prompts(tiny_wide, capsys):
    """`apply --protect-suite` reads the stack's neutral prompts (fact edits only) and keeps their
    4-token continuations through a later last-layer edit (without it, the same edit changes them)."""
    from felix.patches import PatchStack
    from felix.splice_data import stack_neutral

    model, tok, ckpt, *_ = tiny_wide
    ck, suite = str(ckpt.path), ["def f(self", "def __iter__(self"]
    loose = ["--method", "closed_form_a", "--layers", "3", "--max-ppl-increase", "1", "--max-neutral-kl", "10"]
    first, second = counterfactual(model, tok, "import ", rank=1), counterfactual(model, tok, rank=1)
    try:
        rc, _ = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", tok.decode(first.ids[: first.n_prompt]),
                     "--target", tok.decode(first.target), *[a for p in suite for a in ("--neutral", p)], *loose)
        assert rc == 0 and stack_neutral(PatchStack.open(ckpt.path)) == suite
        PatchStack.open(ckpt.path).restore(model)
        before = greedy_continuations(model, [tok.encode(p) for p in suite], 4)
        rc, out = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", tok.decode(second.ids[: second.n_prompt]),
                       "--target", tok.decode(second.target), "--protect-suite", "--neutral-tokens", "4", *loose)
        assert rc == 0 and out["results"][0]["metrics"]["success"]
        PatchStack.open(ckpt.path).restore(model)
        assert greedy_continuations(model, [tok.encode(p) for p in suite], 4) == before
    finally:
        while PatchStack.open(ckpt.path).list():
            _cli(capsys, "rollback", "--checkpoint", ck)
        model.load_splice_state(load_model(ckpt.path)[0].splice_state())


def test_cli_bench_and_make_edits(tiny, capsys, tmp_path):
    model, tok, ckpt, *_ = tiny
    reqs = []
    for p in ("def __init__(self", "import "):
        ex = counterfactual(model, tok, p)
        # the first edit's own prompt as a neutral prompt: an edit that holds must break it
        reqs.append(EditRequest(p, tok.decode(ex.target), [" " + p], ["class ", "if ", "def __init__(self"]))
    save_requests(tmp_path / "edits.jsonl", reqs)
    progress: list[str] = []
    rc, out = _cli(capsys, "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "edits.jsonl"),
                   "--n", "2", "--layers", "3", "--method", "kl_train", "--steps", "40", "--lr", "0.03",
                   "--max-ppl-increase", "1", "--max-neutral-kl", "10", "--out", str(tmp_path / "bench"),
                   "--keep-patches", str(tmp_path / "kept"), err=progress)
    assert rc == 0
    # progress on stderr, one line per edit, even with --json (whose stdout ends in the result)
    assert [line.split()[:2] for line in progress if line.startswith("step")] == [["step", "1/2"], ["step", "2/2"]]
    # said before the references, which take minutes on a big model: what comes, and the re-quantization after
    assert progress[0].startswith("bench: starting 2 edits") and "(rq4: plain and GPTQ)" in progress[0]
    assert {"success_rate", "paraphrase_rate", "retention_rate", "locality_rate", "ppl_drift"} <= out.keys()
    for key in ("requantized", "requantized_gptq"):
        assert {"retention_rate", "paraphrase_rate", "locality_rate", "ppl_drift"} <= out[key].keys()
    # the drift is the mix's: its sources' log-perplexity changes, weighted as the mix weights them
    config = json.loads((tmp_path / "bench" / "bench.json").read_text())["config"]
    weights = {s: v["weight"] for s, v in config["heldout"].items()}
    assert set(out["ppl_drift_by_source"]) == set(weights) == {"code", "prose"}
    mixed = math.exp(sum(w * math.log1p(out["ppl_drift_by_source"][s]) for s, w in weights.items())) - 1
    assert out["ppl_drift"] == pytest.approx(mixed, rel=1e-6, abs=1e-9)
    from felix.patches import PatchStack

    assert len(PatchStack.open(tmp_path / "kept")) == out["applied"] > 0
    from felix.cli import main

    capsys.readouterr()
    assert main(["splice", "bench", "--checkpoint", str(ckpt.path), "--edits", str(tmp_path / "edits.jsonl"),
                 "--n", "1", "--keep-patches", str(tmp_path / "kept")]) == 2
    assert "already holds patches" in capsys.readouterr().err
    assert len(out["steps"]) == 2 and out["success_rate"] > 0
    breaks = out["locality_breaks"]
    assert out["locality_rate"] == pytest.approx(1 - len(breaks) / 3)
    assert out["locality_next_token_rate"] >= out["locality_rate"]
    assert out["locality_next_token_rate"] == pytest.approx(1 - sum(b["next_token_changed"] for b in breaks) / 3)
    for b in breaks:
        assert b["before"] != b["after"]
        assert b["first_changed"]["edit"] == out["steps"][b["first_changed"]["step"] - 1]["id"]
    if out["retention_rate"] == 1:  # the first edit still holds, so its prompt, a neutral one, has changed
        own = [b for b in breaks if b["prompt"] == "def __init__(self"]
        assert own and own[0]["first_changed"]["step"] == 1 and own[0]["next_token_first_changed"]["step"] == 1
    assert "circuit_distance" in out["steps"][-1] and -1 <= out["circuit_stability"] <= 1
    assert (tmp_path / "bench" / "bench.png").stat().st_size > 0
    assert not (ckpt.path / "splices" / "stack.json").is_file() or not json.loads(
        (ckpt.path / "splices" / "stack.json").read_text())["patches"]  # the bench leaves the checkpoint alone


def test_cli_make_edits_from_facts_needs_a_facts_source(tiny, capsys, tmp_path):
    from felix.cli import main

    ckpt = tiny[2]
    capsys.readouterr()
    assert main(["splice", "make-edits", "--checkpoint", str(ckpt.path), "--out", str(tmp_path / "e.jsonl"),
                 "--n", "5", "--source", "facts"]) == 2
    assert "no 'facts' source" in capsys.readouterr().err and not (tmp_path / "e.jsonl").exists()


def test_cli_make_edits_writes_preservation_prompts_for_facts_only(tiny, capsys, tmp_path):
    from felix.cli import main

    ckpt = tiny[2]
    capsys.readouterr()
    assert main(["splice", "make-edits", "--checkpoint", str(ckpt.path), "--out", str(tmp_path / "e.jsonl"),
                 "--n", "2", "--preserve-out", str(tmp_path / "p.jsonl")]) == 2
    assert "--preserve-out needs --source facts" in capsys.readouterr().err
    assert not (tmp_path / "e.jsonl").exists() and not (tmp_path / "p.jsonl").exists()
    # one file for both: the preservation prompts would have replaced the edits just written
    assert main(["splice", "make-edits", "--checkpoint", str(ckpt.path), "--out", str(tmp_path / "e.jsonl"),
                 "--n", "2", "--source", "facts", "--preserve-out", str(tmp_path / "." / "e.jsonl")]) == 2
    assert "is --out" in capsys.readouterr().err and not (tmp_path / "e.jsonl").exists()


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])  # no CUDA here, or fewer than 100 devices there
def test_a_device_that_is_not_there_is_refused_naming_it(tiny, capsys, device):
    from felix.cli import main

    ckpt = str(tiny[2].path)
    capsys.readouterr()
    assert main(["splice", "list", "--checkpoint", ckpt, "--device", device]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and f"device {device!r}" in cap.err, cap.err
    assert main(["splice", "list", "--checkpoint", ckpt, "--device", "cpu"]) == 0


def test_diagnose_k_below_one_is_refused_naming_the_flag(capsys):
    from felix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["splice", "diagnose", "--checkpoint", "unused", "--k", "0"])
    assert exc.value.code == 2 and "argument --k: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_request_arguments_are_checked_per_verb(tiny, capsys, tmp_path):
    """diagnose has no --edits to suggest; apply refuses --edits with a request on the command line, which it
    used to ignore."""
    from felix.cli import main
    from felix.patches import PatchStack

    ckpt = tiny[2]
    ck, edits = str(ckpt.path), tmp_path / "e.jsonl"
    save_requests(edits, [EditRequest("def ", " f")])
    before = PatchStack.open(ckpt.path).list()
    capsys.readouterr()
    try:
        assert main(["splice", "apply", "--checkpoint", ck, "--edits", str(edits), "--prompt", "import ",
                     "--target", " os", "--neutral", "if "]) == 2
        assert f"--prompt, --target, --neutral cannot be given with --edits {edits}" in capsys.readouterr().err
    finally:  # the old code applied the file's edit
        for _ in range(len(PatchStack.open(ckpt.path).list()) - len(before)):
            assert main(["splice", "rollback", "--checkpoint", ck]) == 0
    assert main(["splice", "diagnose", "--checkpoint", ck, "--prompt", "", "--target", " y"]) == 2
    err = capsys.readouterr().err
    assert "splice diagnose needs --prompt and --target; --prompt is empty" in err and "--edits" not in err
    assert main(["splice", "apply", "--checkpoint", ck, "--target", " y"]) == 2
    assert "splice apply needs --prompt and --target (or --edits FILE)" in capsys.readouterr().err
    assert PatchStack.open(ckpt.path).list() == before


def test_cli_apply_cuts_long_neutral_and_preservation_prompts_to_the_context(tiny_wide, capsys, tmp_path):
    """Neutral and preservation prompts longer than max_seq_len keep their ends, as edit prompts do (they
    crashed the covariance and continuation passes: 'sequence of N positions exceeds max_seq_len')."""
    from felix.patches import PatchStack
    from felix.splice_data import save_prompts

    model, tok, ckpt, *_ = tiny_wide
    ck, long = str(ckpt.path), "x = 1\n" * model.cfg.max_seq_len + "def f(self"
    save_prompts(tmp_path / "keep.jsonl", [long, "import os"])
    ex = counterfactual(model, tok, "import ", rank=1)
    try:
        rc, out = _cli(capsys, "apply", "--checkpoint", ck, "--prompt", tok.decode(ex.ids[: ex.n_prompt]),
                       "--target", tok.decode(ex.target), "--neutral", long, "--neutral-tokens", "4",
                       "--preserve-prompts", str(tmp_path / "keep.jsonl"), "--prompt-repair", "1",
                       "--method", "closed_form_a", "--layers", "3", "--max-ppl-increase", "1",
                       "--max-neutral-kl", "10")
        assert rc == 0 and out["results"][0]["metrics"]["success"]
    finally:
        while PatchStack.open(ckpt.path).list():
            _cli(capsys, "rollback", "--checkpoint", ck)
        model.load_splice_state(load_model(ckpt.path)[0].splice_state())
