"""What a continued run (--resume, --init-from) checks and finds: the checkpoint's tokenizer against the run's, the
run's own data paths from any working directory, and under torchrun that every rank took the same checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from test_trainer import write_config

from felix.checkpoint import TOKENIZER_FILE, latest_checkpoint, list_checkpoints, load_checkpoint
from felix.cli import main
from felix.config import load_config
from felix.errors import FelixError
from felix.shards import write_shards
from felix.tokenizer import FelixTokenizer, train_tokenizer
from felix.trainer import Trainer


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_checkpoint_of_another_tokenizer_is_refused_unless_weights_only_opts_in(tmp_path, tiny_mix):
    """tokenizer.json retrained at the same path (same vocab size) and the shards made again with it: the shards
    agree with it, so only the checkpoint's copy tells that the ids now mean other text."""
    data = tmp_path / "data"
    shutil.copytree(tiny_mix.root, data)
    cfg = load_config(write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0),
                      [f"data.tokenizer={data / 'tokenizer.json'}", f"data.mix={data / 'mix.yaml'}"])
    Trainer(cfg, tmp_path / "a", progress=False).run()
    old = FelixTokenizer.load(data / "tokenizer.json")
    new = train_tokenizer([data / "prose.jsonl"], 512, data / "tokenizer.json")
    assert new.vocab_size == old.vocab_size and new.hf.get_vocab() != old.hf.get_vocab()
    for name in ("code", "prose"):
        write_shards(_docs(data / f"{name}.jsonl"), new, data / "shards" / name, val_fraction=0.15, seed=3)
    saved = latest_checkpoint(tmp_path / "a") / TOKENIZER_FILE
    both = (re.escape(f"{saved}: the checkpoint was trained with another tokenizer than this run's data.tokenizer "
                      f"{data / 'tokenizer.json'} (") + r"\d+ of 512 ids name other tokens\)")
    with pytest.raises(FelixError, match=both + ".*--init-weights-only --allow-new-tokenizer"):
        Trainer(cfg, tmp_path / "a", resume=True, progress=False)
    with pytest.raises(FelixError, match=both):
        Trainer(cfg, tmp_path / "b", init_from=tmp_path / "a", progress=False)
    with pytest.raises(FelixError, match=both + ".*pass --allow-new-tokenizer to start from its weights"):
        Trainer(cfg, tmp_path / "c", init_from=tmp_path / "a", init_weights_only=True, progress=False)
    assert latest_checkpoint(tmp_path / "b") is None and latest_checkpoint(tmp_path / "c") is None
    fresh = Trainer(cfg, tmp_path / "c", init_from=tmp_path / "a", init_weights_only=True, allow_new_tokenizer=True,
                    progress=False)
    assert fresh.state.step == 0
    fresh.close()


def test_the_tokenizer_is_compared_by_its_ids_not_its_bytes(tmp_path, tiny_mix, capsys):
    """The checkpoint's tokenizer.json saved again (other whitespace and key order) makes the same ids: resumed."""
    cfg_path = write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0)
    Trainer(load_config(cfg_path), tmp_path / "a", progress=False).run()
    saved = latest_checkpoint(tmp_path / "a") / TOKENIZER_FILE
    saved.write_text(json.dumps(json.loads(saved.read_text(encoding="utf-8")), indent=4, sort_keys=True))
    assert saved.read_bytes() != tiny_mix.tokenizer_path.read_bytes()
    resumed = Trainer(load_config(cfg_path, ["train.max_steps=3"]), tmp_path / "a", resume=True, progress=False)
    assert resumed.run().steps == 3
    resumed.close()
    # the opt-in belongs to a fresh start from weights alone
    assert main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "b"), "--init-from",
                 str(tmp_path / "a"), "--allow-new-tokenizer"]) == 2
    assert "--allow-new-tokenizer needs --init-weights-only" in capsys.readouterr().err


def test_a_resume_from_another_directory_reads_the_runs_data(tmp_path, tiny_mix, monkeypatch, capsys):
    """Data paths given relative to where the run started (a scheduler's requeue starts elsewhere); the mix's
    sources are relative to the mix file."""
    cfg_path = tmp_path / "cfg.yaml"
    raw = yaml.safe_load(write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0).read_text())
    raw["data"] = {"tokenizer": "tokenizer.json", "mix": "mix.yaml"}
    cfg_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    monkeypatch.chdir(tiny_mix.root)
    assert main(["train", "--config", str(cfg_path), "--out", str(run), "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "train.max_steps=3"]) == 0
    assert "relative paths" not in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step-00000003"
    # recorded absolute, in the checkpoints too (what later readers of them find: splice, survival)
    recorded = load_config(run / "config.yaml").data
    assert (recorded.tokenizer, recorded.mix) == (str(tiny_mix.tokenizer_path), str(tiny_mix.mix_path))
    assert load_checkpoint(latest_checkpoint(run)).config.data.mix == str(tiny_mix.mix_path)


def test_a_run_dir_with_relative_paths_still_resumes_where_it_was_started(tmp_path, tiny_mix, monkeypatch, capsys):
    """config.yaml as runs wrote it before they recorded absolute paths: read against the working directory, as
    then, with a warning saying so; the resume records them absolute."""
    run = tmp_path / "run"
    Trainer(load_config(write_config(tmp_path, tiny_mix, max_steps=2, eval_every=0)), run, progress=False).run()
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["data"] |= {"tokenizer": "tokenizer.json", "mix": "mix.yaml"}
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tiny_mix.root)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert (f"config.yaml: relative paths (data.tokenizer: tokenizer.json; data.mix: mix.yaml), read against the "
            f"working directory {tiny_mix.root}") in err
    assert load_config(run / "config.yaml").data.tokenizer == str(tiny_mix.tokenizer_path)


def _notes(caught: list[warnings.WarningMessage]) -> str:
    return "\n".join(str(w.message) for w in caught)


def test_a_resume_with_a_smaller_micro_batch_warns_of_the_batch_and_evaluates_the_same_windows(tmp_path, tiny_mix):
    """Lowering train.micro_batch_size after an out-of-memory is what a user does: before, it halved the tokens per
    step without a word, and each evaluation read eval_batches x micro_batch_size x ranks windows, so the val
    curve jumped."""
    cfg_path = write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=1, eval_every=0, eval_batches=2)
    first = Trainer(load_config(cfg_path), tmp_path / "run", progress=False)
    first.run()
    before = first.evaluate()
    first.close()
    own = tmp_path / "run" / "config.yaml"  # what `felix train --resume` without --config reads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smaller = Trainer(load_config(own, ["train.micro_batch_size=2"]), tmp_path / "run", resume=True,
                          progress=False)
    assert ("tokens per optimizer step change from 128 (4 micro-batch x 1 accumulation x 1 rank x 32 seq_len) to "
            "64 (2 micro-batch x 1 accumulation x 1 rank x 32 seq_len): the lr and schedule were set for the "
            "checkpoint's batch; train.grad_accum_steps=2 keeps it") in _notes(caught)
    assert "val windows" not in _notes(caught)  # the run's config.yaml pins eval_sequences (2 x 4)
    assert smaller.cfg.train.eval_sequences == 8
    assert smaller.evaluate() == pytest.approx(before, rel=1e-6)  # the same weights on the same 8 windows
    smaller.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(load_config(own, ["train.micro_batch_size=1", "train.grad_accum_steps=4"]), tmp_path / "run",
                resume=True, progress=False).close()
    assert "tokens per optimizer step" not in _notes(caught)
    # the original file leaves eval_sequences to eval_batches x micro_batch_size: 4 now, said with how to keep 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(load_config(cfg_path, ["train.micro_batch_size=2", "train.grad_accum_steps=2"]), tmp_path / "run",
                resume=True, progress=False).close()
    assert _notes(caught) == (f"{tmp_path / 'run' / 'checkpoints' / 'step-00000002'}: evaluations read 4 val "
                              f"windows, the checkpoint's run 8: val loss is not comparable with its earlier "
                              f"evaluations; train.eval_sequences=8 keeps it")


def test_a_resume_with_reweighted_mix_warns_that_val_loss_moves(tmp_path, tiny_mix):
    """The val stream draws its windows by the mix's weights: after `--resume data.mix=<other weights>` the same
    weights scored another val loss, and the curve jumped with only the training draw's warning to explain it."""
    from felix.datamix import DataMix, MixSource

    cfg_path = write_config(tmp_path, tiny_mix, max_steps=2, warmup_steps=1, eval_every=1, eval_sequences=8)
    first = Trainer(load_config(cfg_path), tmp_path / "run", progress=False)
    first.run()
    before = first.evaluate()
    first.close()
    mix2 = tmp_path / "mix2.yaml"
    DataMix(sources=[MixSource(name=n, shards=tiny_mix.root / "shards" / n, weight=w)
                     for n, w in (("code", 0.1), ("prose", 0.9))]).write(mix2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = Trainer(load_config(cfg_path, [f"data.mix={mix2}"]), tmp_path / "run", resume=True, progress=False)
    assert moved.evaluate() != pytest.approx(before, rel=1e-3)  # what the note is for
    moved.close()
    assert ("the data mix's weights changed, and evaluations draw their 8 val windows by them: val loss from step 2 "
            "on is measured on another val set") in _notes(caught)
    with warnings.catch_warnings(record=True) as caught:  # the same weights: no such note
        warnings.simplefilter("always")
        Trainer(load_config(cfg_path), tmp_path / "run", resume=True, progress=False).close()
    assert "val set" not in _notes(caught)


def test_the_batch_change_names_the_ranks_and_whether_accumulation_can_keep_it():
    from felix.config import TrainConfig
    from felix.train_resume import batch_changes

    two_gpus = TrainConfig(seq_len=2048, micro_batch_size=4, grad_accum_steps=8, eval_sequences=128)
    assert batch_changes(two_gpus, two_gpus, 2, 1) == [
        "tokens per optimizer step change from 131,072 (4 micro-batch x 8 accumulation x 2 ranks x 2048 seq_len) "
        "to 65,536 (4 micro-batch x 8 accumulation x 1 rank x 2048 seq_len): the lr and schedule were set for the "
        "checkpoint's batch; train.grad_accum_steps=16 keeps it"]
    three = two_gpus.model_copy(update={"micro_batch_size": 3})
    assert batch_changes(two_gpus, three, 2, 2)[0].endswith(
        "no train.grad_accum_steps keeps it with micro-batch 3 on 2 ranks")
    assert batch_changes(two_gpus, two_gpus, None, 2) == []  # a checkpoint without its world size: taken as these


# `felix train --resume` with another --out on each rank: what nodes that each write --out to a disk of their own see
PER_RANK_OUT = """
import os, sys
from felix.cli import main
cfg, *outs = sys.argv[1:]
sys.exit(main(["train", "--config", cfg, "--out", outs[int(os.environ["RANK"])], "--resume", "--no-progress"]))
"""


def test_under_torchrun_ranks_that_resume_from_different_steps_stop_at_once(tmp_path, tiny_mix):
    """Before, rank 1, finding no checkpoint in its --out, trained on from step 0 beside rank 0's step 4: DDP gave it
    rank 0's weights, but not its optimizer, lr or data position, and rank 0 wrote checkpoints of that run until
    rank 1, still short of max_steps, failed when rank 0 ended (the start's warning was rank 0's alone)."""
    cfg = write_config(tmp_path, tiny_mix, max_steps=8, micro_batch_size=2, ckpt_every=4, eval_every=0)
    trainer = Trainer(load_config(cfg), tmp_path / "node0", progress=False)
    trainer.run(until=4)
    trainer.close()
    script = tmp_path / "per_rank_out.py"
    script.write_text(PER_RANK_OUT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(cfg),
         str(tmp_path / "node0"), str(tmp_path / "node1")],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"felix train: error: .*node[01]: the ranks started at different steps \(step 0: rank 1; "
                     r"step 4: rank 0\): .* one directory they all share", proc.stderr), proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "node0")] == ["step-00000004"]  # nothing trained on
    assert not (tmp_path / "node1" / "checkpoints").exists()


# `felix train` with overrides of its own on each rank: what nodes started with configs that differ see
PER_RANK_OVERRIDES = """
import os, sys
from felix.cli import main
cfg, out, *extra = sys.argv[1:]
sys.exit(main(["train", "--config", cfg, "--out", out, "--no-progress", *(extra if os.environ["RANK"] == "1" else [])]))
"""


@pytest.mark.slow  # three processes that import torch
def test_under_torchrun_ranks_started_with_different_configs_stop_at_once_naming_the_fields(tmp_path, tiny_mix):
    """Before, a rank with another seed or mix weights trained on, silently reading other windows than the global
    stream's (some twice, some never); another micro-batch or lr too. Threads and the data's paths may differ."""
    from felix.datamix import DataMix, MixSource

    shards = tiny_mix.root / "shards"
    DataMix(sources=[MixSource(name="code", shards=shards / "code", weight=0.5),
                     MixSource(name="prose", shards=shards / "prose", weight=0.5)]).write(tmp_path / "mix.yaml")
    cfg = write_config(tmp_path, tiny_mix, max_steps=4, micro_batch_size=2, eval_every=0)
    script = tmp_path / "per_rank_overrides.py"
    script.write_text(PER_RANK_OVERRIDES)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(cfg),
         str(tmp_path / "run"), "train.seed=7", "train.threads=2", f"data.mix={tmp_path / 'mix.yaml'}"],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode != 0
    # every rank says so, naming itself (torchrun's summary would blame whichever rank it saw exit first)
    for rank in (0, 1):
        assert f"felix train: error: rank {rank}: the ranks were started with different" in proc.stderr
    error = re.search(r"felix train: error: rank 0: the ranks were started with different configs or data .*",
                      proc.stderr)
    assert error, proc.stderr[-3000:]
    assert ("rank 1: source 'code' 'weight 0.7, " in error[0] and "source 'prose' 'weight 0.3, " in error[0]
            and "train.seed 1337 -> 7" in error[0] and "threads" not in error[0].split("(only")[0]), error[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
