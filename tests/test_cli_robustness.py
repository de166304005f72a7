"""Bad input to `felix generate`, `felix tokenizer` and `felix validate`: one clear error line naming the flag,
file or field, nothing written to stdout or disk on failure, and output that matches the JSON report."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch

from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import FelixConfig, ModelConfig, TrainConfig
from felix.errors import FelixError
from felix.model import FelixLM
from felix.tokenizer import train_tokenizer

DOCS = [f"line {i} of some text, with words and more words. héllo ✓ 🙂" for i in range(100)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust_tok")
    (root / "src.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return train_tokenizer([root / "src.jsonl"], 300, root / "tokenizer.json").path


def _checkpoint(root: Path, tok_path: Path, vocab_size: int) -> Path:
    """A random-init FelixLM saved as a training checkpoint, with `tok_path` copied in."""
    torch.manual_seed(0)
    model = ModelConfig(vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=24,
                        splice_every=2, splice_rank=4)
    cfg = FelixConfig(model=model, train=TrainConfig(seq_len=16))
    save_checkpoint(root / "run", 1, FelixLM(model), cfg, {}, tokenizer_path=tok_path)
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok_path) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("robust_ckpt"), tok_path, 300)


def _fails(capsys, argv: list[str], match: str) -> str:
    """Run argv; assert exit 2, an empty stdout and `match` in the one-line error; return the error."""
    capsys.readouterr()
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and match in cap.err, cap.err
    return cap.err


# -- felix generate -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, match", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", "-5"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--device", "nonsense"], "device 'nonsense'"),
    (["--device", "cuda:99"], "device 'cuda:99'"),  # no CUDA here, or fewer than 100 devices there
])
def test_generate_bad_flags_are_one_line_errors(capsys, run_dir, flags, match):
    _fails(capsys, ["generate", "--checkpoint", str(run_dir), "--prompt", "hello", *flags], match)


def test_generate_temperature_zero_and_greedy_flag_decode_alike(capsys, run_dir):
    def completion(*flags: str) -> str:
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "line 3", "--max-new-tokens", "6",
                     "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]

    # --greedy ignores the temperature, so a negative one with it is no error
    assert completion("--temperature", "0") == completion("--greedy") == completion("--greedy", "--temperature", "-1")


def test_generate_says_when_greedy_makes_a_sampling_option_do_nothing(capsys, run_dir):
    """Before: `--greedy --temperature 0.8 --top-k 5` decoded greedily without a word (transformers warns of
    sampling options without do_sample)."""
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "line 3", "--max-new-tokens", "2", "--json"]
    assert main([*argv, "--greedy", "--temperature", "0.8", "--top-k", "5"]) == 0
    assert "warning: --greedy decodes by argmax: --temperature and --top-k change nothing" in capsys.readouterr().err
    assert main([*argv, "--greedy"]) == 0 and main([*argv, "--temperature", "0.8"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_generate_top_p_keeps_the_most_likely_tokens(capsys, run_dir):
    def completion(*flags: str) -> str:
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "line 3", "--max-new-tokens", "6",
                     "--json", "--temperature", "1", "--top-k", "0", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]

    greedy = completion("--greedy")
    # a nucleus this small holds only the most likely token: every seed samples the greedy text
    assert all(completion("--top-p", "1e-9", "--seed", str(seed)) == greedy for seed in range(4))
    assert any(completion("--seed", str(seed)) != greedy for seed in range(4))  # the full distribution does not


def test_generate_says_when_the_context_caps_the_new_tokens(capsys, run_dir):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "line 3", "--max-new-tokens", "100",
                 "--greedy", "--json"]) == 0
    cap = capsys.readouterr()
    note = re.search(r"note: at most (\d+) new tokens fit the model's context of 24 after this (\d+)-token", cap.err)
    assert note and int(note[1]) + int(note[2]) == 24, cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["tokens"] <= int(note[1])


def test_generate_prompt_too_long_writes_nothing_to_stdout(capsys, run_dir):
    _fails(capsys, ["generate", "--checkpoint", str(run_dir), "--prompt", "hello world " * 40],
           "leaves no room in max_seq_len 24")


def test_generate_non_utf8_prompt_is_an_error(capsys, run_dir):
    # undecodable command-line bytes reach Python as lone surrogates (surrogateescape)
    _fails(capsys, ["generate", "--checkpoint", str(run_dir), "--prompt", "ab\udcffc"], "lone surrogate")


def test_generate_text_output_is_the_json_completion_even_ending_mid_character(capsys, run_dir):
    """The text mode holds back a character whose bytes are still arriving; a sample that ends there
    must still print what it holds, as the JSON completion does."""
    cut_short = 0
    for seed in range(6):
        for n in (1, 2, 3):
            argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "héllo", "--seed", str(seed),
                    "--max-new-tokens", str(n)]
            capsys.readouterr()
            assert main([*argv, "--json"]) == 0
            completion = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]
            assert main(argv) == 0
            assert capsys.readouterr().out == "héllo" + completion + "\n"
            cut_short += completion.endswith("\ufffd")
    assert cut_short  # the case under test happened


def test_checkpoint_given_as_a_file_or_missing(capsys, run_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for path in (tmp_path / "notes.txt", tmp_path / "missing"):
        _fails(capsys, ["generate", "--checkpoint", str(path), "--prompt", "hi"], f"no checkpoint found at {path}")


def test_corrupt_tokenizer_in_checkpoint_is_named(capsys, tmp_path, tok_path):
    run = _checkpoint(tmp_path, tok_path, 300)
    bad = next(run.glob("checkpoints/step-*/tokenizer.json"))
    bad.write_bytes(b'{"version": "1.0", "model": ')
    _fails(capsys, ["generate", "--checkpoint", str(run), "--prompt", "hi"], f"{bad}: not a valid tokenizer.json")


def test_tokenizer_larger_than_the_model_is_refused(capsys, tmp_path, tok_path):
    """Its top ids would index past the embedding: an IndexError deep in torch, before this check."""
    run = _checkpoint(tmp_path, tok_path, 270)
    _fails(capsys, ["generate", "--checkpoint", str(run), "--prompt", "words " * 3],
           "tokenizer has 300 tokens, more than the model's model.vocab_size 270")


# -- felix tokenizer --------------------------------------------------------------------------------------------
def test_tokenizer_train_output_that_is_an_input_is_refused_and_the_input_kept(capsys, tmp_path):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    before = src.read_bytes()
    _fails(capsys, ["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out",
                    str(tmp_path / "." / "corpus.jsonl")], "the output is also an input")
    assert src.read_bytes() == before


def test_tokenizer_train_checks_paths_before_training(capsys, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(DOCS), encoding="utf-8")
    base = ["tokenizer", "train", "--vocab-size", "300"]
    _fails(capsys, [*base, "--input", str(src), str(tmp_path / "typo.txt"), "--out", str(tmp_path / "t.json")],
           "typo.txt: no such file")
    _fails(capsys, [*base, "--input", str(tmp_path), "--out", str(tmp_path / "t.json")], "is a directory")
    _fails(capsys, [*base, "--input", str(src), "--out", str(tmp_path)], "is a directory; give the tokenizer.json")
    _fails(capsys, [*base, "--input", str(src), "--min-frequency", "-1", "--out", str(tmp_path / "t.json")],
           "min_frequency must be >= 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]  # nothing half-written
    # an output directory that does not exist yet is made, as the other verbs make theirs
    assert main([*base, "--input", str(src), "--out", str(tmp_path / "new" / "tok.json")]) == 0
    assert (tmp_path / "new" / "tok.json").is_file()


def test_lone_surrogates_are_errors_naming_the_line(tmp_path, tok_path):
    from felix.tokenizer import FelixTokenizer

    src = tmp_path / "docs.jsonl"  # JSON may spell a lone surrogate, which UTF-8 cannot hold
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(FelixError, match=r"docs.jsonl: line 2: '\\ud800' at character 4 is a lone surrogate"):
        train_tokenizer([src], 300, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
    tok = FelixTokenizer.load(tok_path)
    for encode in (tok.encode, lambda t: tok.encode(t, allow_special=True), lambda t: tok.encode_batch(["ok", t])):
        with pytest.raises(FelixError, match="lone surrogate"):
            encode("x\udcffy")


# -- felix validate ---------------------------------------------------------------------------------------------
GOOD = {"input": "10:02 deploy 2.4.1 started\n10:30 stalled at 40% on 12 pods", "task": "encoding",
        "output": {"title": "Deploy of 2.4.1 stalled"}}


@pytest.mark.parametrize("field, value", [
    ("must_contain", "Priya"),  # used to become the checks "P", "r", "i", "y", "a"
    ("must_contain", 5),
    ("must_contain", [4]),
    ("must_not_fabricate", "Tomas"),
    ("expect_refusal", "yes"),
    ("expect", ["outcome"]),
])
def test_validate_wrongly_typed_ground_truth_is_named(capsys, tmp_path, field, value):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, field: value}) + "\n", encoding="utf-8")
    err = _fails(capsys, ["validate", str(path)], f'{path}:2: "{field}" must be')
    assert json.dumps(value) in err


def test_validate_null_ground_truth_is_accepted(capsys, tmp_path):
    path = tmp_path / "out.jsonl"
    rec = {**GOOD, "must_contain": None, "must_not_fabricate": None, "expect_refusal": None, "expect": None}
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    assert main(["validate", str(path), "--json"]) == 1  # judged (the output lacks fields), not refused
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]["items"] == 1


@pytest.mark.parametrize("flags, match", [(["--corpus-mb", "nan"], "--corpus-mb must be a positive"),
                                          (["--corpus-mb", "0"], "--corpus-mb must be a positive"),
                                          (["--facts-weight", "-1"], "--facts-weight must be >= 0"),
                                          (["--facts-weight", "inf"], "--facts-weight must be >= 0")])
def test_demo_bad_sizes_are_one_line_errors_before_any_work(capsys, tmp_path, flags, match):
    """`--corpus-mb nan` was a ValueError traceback from int()."""
    assert main(["demo", "--out", str(tmp_path / "demo"), *flags]) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    """`felix info ... | head -1`: the reader went away; no traceback, the status a shell gives SIGPIPE."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child writes: its first flush fails, every time
    try:
        proc = subprocess.run([sys.executable, "-m", "felix", "info", "--config", "demo"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_a_broken_pipe_of_the_verbs_own_is_not_taken_for_a_closed_stdout(monkeypatch):
    """Before: any BrokenPipeError ended the verb quietly with 141, as `| head` does, so a connection of its own
    that broke (a teacher's, a client's) looked like success cut short; stdout is fine, so it is raised."""
    import felix.commands.info as info

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info, "run", broken)
    with pytest.raises(BrokenPipeError):
        main(["info", "--config", "demo"])


def test_a_ctrl_c_names_itself_as_a_sigterm_does(monkeypatch, capsys):
    """Before: a Ctrl-C ended every verb with a bare "interrupted", where SIGTERM printed "felix VERB: stopped by
    SIGTERM" (the verbs' JSON says "SIGINT" for it)."""
    import felix.commands.info as info
    from felix.errors import RunStopped

    def stopped(exc: BaseException):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(info, "run", stopped(KeyboardInterrupt()))
    assert main(["info", "--config", "demo"]) == 130
    assert capsys.readouterr().err.strip() == "felix info: stopped by SIGINT"
    monkeypatch.setattr(info, "run", stopped(RunStopped("stopped by SIGTERM", signal.SIGTERM)))
    assert main(["info", "--config", "demo"]) == 143
    assert capsys.readouterr().err.strip() == "felix info: stopped by SIGTERM"


def test_a_verb_run_with_stdout_closed_still_works(monkeypatch, capsys):
    """`felix info ... >&-`: Python starts with sys.stdout None, print() drops what it is given, and the
    flush that catches a closed pipe must not turn a finished run into an AttributeError traceback."""
    import sys

    monkeypatch.setattr(sys, "stdout", None)
    assert main(["info", "--config", "demo"]) == 0
