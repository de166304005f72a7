"""The `felix` command line: every verb's parser, `felix --help` staying light, and how a verb's warnings read."""

import subprocess
import sys
import warnings

import pytest

from felix.cli import VERBS, main


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_registers_its_parser(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"usage: felix {verb} ")


def test_top_level_help_lists_every_verb_without_importing_torch():
    code = ("import sys\nfrom felix.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for verb, help_line in VERBS.items():
        assert verb in out and help_line.split()[0] in out
    assert out.strip().endswith("torch imported: False")


def test_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, prog", [
    (["quantize", "--config", "demo", "--format", "rq4", "--bogus"], "felix quantize"),
    (["quantize", "--config", "demo", "--format", "rq4", "model.n_layers=1", "--bogus"], "felix quantize"),
    (["splice", "apply", "--checkpoint", "x", "--bogus"], "felix splice apply"),
    (["splice", "--bogus", "apply", "--checkpoint", "x"], "felix splice"),
    (["--bogus"], "felix"),
])
def test_an_unknown_option_is_the_error_of_the_verb_given_it(argv, prog, capsys):
    """Before: every level's unknown argument was reported by the top level, under `usage: felix [-h]
    [--version] <verb> ...`, which says nothing of what the verb takes."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"usage: {prog} ")
    assert err.rstrip().endswith(f"{prog}: error: unrecognized arguments: --bogus")


def test_config_overrides_stay_positionals_of_the_verb(capsys):
    assert main(["quantize", "--config", "demo", "model.n_layers=1", "--format", "q8_0", "--json"]) == 0
    assert '"format": "q8_0"' in capsys.readouterr().out


def test_a_verbs_warnings_are_one_plain_line_on_stderr(tmp_path, tiny_mix, capsys):
    from test_trainer import write_config

    shown = warnings.showwarning
    cfg = write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=4, eval_every=0)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert ("felix train: warning: train.warmup_steps (4) >= train.max_steps (2): the run ends inside the warmup "
            "and its lr never decays\n") in err
    assert "UserWarning" not in err and "trainer.py" not in err and "Trainer(" not in err
    assert warnings.showwarning is shown  # restored once the verb is done


@pytest.mark.parametrize("argv, verb", [
    (["splice", "list", "--checkpoint", "/nonexistent/ckpt"], "splice list"),
    (["data", "verify", "/nonexistent/shards"], "data verify"),
    (["quant", "survival", "--checkpoint", "/nonexistent/ckpt", "--format", "q8_0"], "quant survival"),
    (["export", "gguf", "--checkpoint", "/nonexistent/ckpt", "--out", "/nonexistent/m.gguf"], "export gguf"),
    (["train", "--config", "/nonexistent/c.yaml", "--out", "/nonexistent/run"], "train"),
])
def test_an_error_names_the_sub_verb_it_comes_from(argv, verb, capsys):
    """Before: `felix quant: error: ...` for an error of `felix quant survival`."""
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"felix {verb}: error: ")
