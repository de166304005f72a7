"""An --out that cannot be written (a file where a directory goes, a path under a file, a directory no file can
be made in) is a one-line error naming it, raised before the verb's work: never a traceback after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from felix.checkpoint import save_checkpoint
from felix.cli import main
from felix.config import FelixConfig, ModelConfig, TrainConfig
from felix.model import FelixLM


def _fails(capsys, argv: list[str], match: str) -> None:
    """Run argv in-process; assert exit 2, nothing on stdout and `match` in the one-line error."""
    capsys.readouterr()
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and match in cap.err and "Traceback" not in cap.err, cap.err


@pytest.fixture
def afile(tmp_path) -> Path:
    f = tmp_path / "afile"
    f.write_text("keep me")
    return f


def _untouched(tmp_path: Path, afile: Path, also: tuple[str, ...] = ()) -> None:
    """The file is as it was and nothing (no temp, no directory) was left beside it."""
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["afile", *also])


# -- felix tokenizer train: the output is checked before training, which reads the input ----------------
def _bad_input(tmp_path: Path) -> Path:
    """A source whose second line is not JSON: training stops there, so an error about --out instead
    shows that --out was checked before training began."""
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"text": "some text to train on"}) + "\n{not json\n", encoding="utf-8")
    return src


def test_tokenizer_out_under_a_file_is_refused_before_training(tmp_path, afile, capsys):
    src = _bad_input(tmp_path)
    _fails(capsys, ["tokenizer", "train", "--input", str(src), "--vocab-size", "300",
                    "--out", str(afile / "t.json")], f"output {afile / 't.json'}: lies under the file {afile}")
    _untouched(tmp_path, afile, ("src.jsonl",))


def test_tokenizer_out_where_no_file_can_be_made_is_refused_before_training(tmp_path, capsys):
    # the project's tests run on Linux, whose /proc takes no new files (not even as root)
    assert Path("/proc/self").is_dir(), "this test needs Linux's /proc"
    src = _bad_input(tmp_path)
    _fails(capsys, ["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", "/proc/t.json"],
           "output /proc/t.json: cannot create files in /proc")


# -- directory outputs: a file at --out, or one on its path ---------------------------------------------
def test_data_corpus_out_under_a_file(tmp_path, afile, capsys):
    _fails(capsys, ["data", "corpus", "--max-bytes", "20000", "--out", str(afile / "c")],
           f"output {afile / 'c'}: lies under the file {afile}")
    _untouched(tmp_path, afile)


def test_data_shard_out_under_a_file(tmp_path, afile, capsys, tiny_mix):
    _fails(capsys, ["data", "shard", "--input", str(tiny_mix.root / "code.jsonl"), "--tokenizer",
                    str(tiny_mix.tokenizer_path), "--out", str(afile / "s")],
           f"output {afile / 's'}: lies under the file {afile}")
    _untouched(tmp_path, afile)


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "under-a-file"])
def test_train_out_that_is_or_lies_under_a_file(tmp_path, afile, capsys, tiny_mix, under):
    out = afile / "run" if under else afile
    want = f"lies under the file {afile}" if under else f"output {afile}: exists and is not a directory"
    _fails(capsys, ["train", "--config", "demo", "--out", str(out), "--no-progress",
                    f"data.tokenizer={tiny_mix.tokenizer_path}", f"data.mix={tiny_mix.mix_path}",
                    "model.vocab_size=512", "train.max_steps=2"], want)
    _untouched(tmp_path, afile)


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "under-a-file"])
def test_demo_out_that_is_or_lies_under_a_file(tmp_path, afile, capsys, under):
    out = afile / "demo" if under else afile
    want = f"lies under the file {afile}" if under else f"output {afile}: exists and is not a directory"
    _fails(capsys, ["demo", "--out", str(out), "--no-progress"], want)
    _untouched(tmp_path, afile)


# -- export and quantize: checked before the checkpoint is read (here it does not even exist) ------------
@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_export_out_under_a_file_is_named_as_such(tmp_path, afile, capsys, fmt):
    """Was "directory afile does not exist", while afile does exist, as a file."""
    _fails(capsys, ["export", fmt, "--checkpoint", str(tmp_path / "no-run"), "--out", str(afile / "x")],
           f"output {afile / 'x'}: lies under the file {afile}")
    _untouched(tmp_path, afile)


def test_quantize_out_under_a_file_is_refused_before_the_work(tmp_path, afile, capsys):
    """Was found only when the artifact was written, after the quantization (minutes of GPTQ on a big model)."""
    _fails(capsys, ["quantize", "--checkpoint", str(tmp_path / "no-run"), "--format", "rq4",
                    "--out", str(afile / "art")], f"--out {afile / 'art'}: lies under the file {afile}")
    _untouched(tmp_path, afile)


# -- felix quantize --seed: only random-init weights (--config) are seeded -------------------------------
def test_quantize_seed_with_a_checkpoint_is_refused(tmp_path, capsys, tiny_mix):
    """A checkpoint's weights are quantized as they are: --seed there was accepted and did nothing."""
    model = ModelConfig(vocab_size=512, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=24,
                        splice_every=2, splice_rank=4)
    save_checkpoint(tmp_path / "run", 1, FelixLM(model), FelixConfig(model=model, train=TrainConfig(seq_len=16)),
                    {}, tokenizer_path=tiny_mix.tokenizer_path)
    _fails(capsys, ["quantize", "--checkpoint", str(tmp_path / "run"), "--format", "rq4", "--seed", "5"],
           "--seed only applies with --config")


def test_quantize_seed_with_config_seeds_the_random_init(capsys):
    assert main(["quantize", "--config", "demo", "--format", "q8_0", "--seed", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "random init of demo (seed 5)"


# -- the shared check itself ------------------------------------------------------------------------
def test_check_output_finds_the_file_however_deep_and_leaves_nothing_behind(tmp_path, afile):
    from felix.atomic import check_output
    from felix.errors import FelixError

    with pytest.raises(FelixError, match=f"output {afile}/a/b/c: lies under the file {afile}$"):
        check_output(afile / "a" / "b" / "c", directory=True)
    with pytest.raises(FelixError, match="directory .*new does not exist"):
        check_output(tmp_path / "new" / "m.gguf", directory=False, make_parents=False)
    (tmp_path / "run").mkdir()
    for out, into in ((tmp_path / "new" / "deeper" / "t.json", False), (tmp_path / "run", True)):
        assert check_output(out, directory=into, into=into) == out  # the write probe is removed again
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile", "run"]
