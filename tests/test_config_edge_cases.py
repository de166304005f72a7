"""Config edge cases: YAML 1.1 booleans in numeric fields (training, mix and harvest configs), empty
sections, keys given twice, model numbers that would train a NaN model or crash its initialisation, and errors
that name the override at fault and the key a typo meant."""

from __future__ import annotations

import pytest
import torch

from felix.config import config_from_dict, load_config
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.harvest_config import TeacherConfig, load_harvest_config
from felix.model import FelixLM

MODEL = {"vocab_size": 64, "n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "max_seq_len": 16}
TRAIN = {"seq_len": 16, "max_steps": 100, "warmup_steps": 10}


@pytest.mark.parametrize(("section", "field", "value"), [
    ("model", "n_layers", True),  # YAML 1.1 reads `yes`/`on`/`true` as a boolean
    ("model", "n_kv_heads", True),  # it was 1 kv head: multi-query attention
    ("train", "max_steps", True),  # a one-step run
    ("train", "lr", True),
    ("train", "decay_start_step", False),
    ("train", "threads", True),
])
def test_a_boolean_in_a_numeric_field_is_refused_naming_it(section, field, value):
    raw = {"model": dict(MODEL), "train": dict(TRAIN)}
    raw[section][field] = value
    with pytest.raises(FelixError, match=rf"run.yaml: {section}.{field}: .*boolean"):
        config_from_dict(raw, "run.yaml")


def test_booleans_and_numbers_still_load_where_they_belong():
    cfg = config_from_dict({"model": MODEL, "train": TRAIN | {"compile": True, "lr": "3e-4", "max_steps": 100.0}})
    assert cfg.train.compile is True and cfg.train.lr == 3e-4 and cfg.train.max_steps == 100
    assert load_config(None, ["train.activation_checkpointing=yes"]).train.activation_checkpointing is True


def test_a_boolean_override_of_a_number_is_refused():
    with pytest.raises(FelixError, match=r"override train.max_steps=yes: train.max_steps: .*boolean"):
        load_config(None, ["train.max_steps=yes"])


def test_a_boolean_mix_weight_or_harvest_number_is_refused():
    with pytest.raises(ValueError, match="boolean"):
        MixSource(name="code", shards="x", weight=True)
    with pytest.raises(ValueError, match=r"rpm\n.*boolean"):  # `rpm: yes` was one request a minute
        TeacherConfig(name="a", provider="openai", model="m", rpm=True)


def test_an_empty_section_means_its_defaults(tmp_path):
    """`train:` with every key commented out is null in YAML: it was refused as 'not a valid dictionary', and
    an override into it said the section was not one."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  vocab_size: 64\n  n_layers: 1\n  d_model: 16\n  n_heads: 2\n  d_ff: 32\n"
                    "  max_seq_len: 16\ntrain:\n  # lr: 1e-3\nquail:\ndata:\n", encoding="utf-8")
    cfg = load_config(path, ["train.seq_len=16", "data.mix=mix.yaml"])
    assert cfg.train.seq_len == 16 and cfg.train.lr == 3e-4 and cfg.data.mix == "mix.yaml"
    assert cfg.quail.enabled is False


def test_a_key_given_twice_is_refused_naming_the_file_and_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: an `lr:` added below the old one silently won
    (or, added above it, silently lost). Training, mix and harvest configs all read YAML the same way."""
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  lr: 1e-3\n  seq_len: 16\n  lr: 3e-4\n", encoding="utf-8")
    with pytest.raises(FelixError, match=r"run.yaml: not valid YAML(.|\n)*key 'lr' a second time \(first on line 2\)"
                                         r"(.|\n)*line 4"):
        load_config(run)
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - name: a\n    shards: a\n    weight: 1\n    name: b\n", encoding="utf-8")
    with pytest.raises(FelixError, match=r"mix.yaml: (.|\n)*key 'name' a second time"):
        DataMix.load(mix)
    harvest = tmp_path / "harvest.yaml"
    harvest.write_text("store: a\nstore: b\n", encoding="utf-8")
    with pytest.raises(FelixError, match=r"harvest.yaml: (.|\n)*key 'store' a second time"):
        load_harvest_config(harvest)
    with pytest.raises(FelixError, match="key 'a' a second time"):
        load_config(None, ["train.lr={a: 1, a: 2}"])


def test_a_merge_key_may_restate_what_it_merges(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  <<: {seq_len: 16, lr: 1e-3}\n  lr: 2e-3\n", encoding="utf-8")
    cfg = load_config(run)
    assert cfg.train.lr == 2e-3 and cfg.train.seq_len == 16


def test_a_scalar_where_a_section_belongs_is_still_refused():
    with pytest.raises(FelixError, match="train is not a section"):
        load_config(None, ["train=5", "train.lr=1"])


@pytest.mark.parametrize(("field", "value"), [
    ("rope_theta", 0.0), ("rope_theta", -10000.0), ("rope_theta", float("nan")), ("rope_theta", float("inf")),
    ("norm_eps", -1e-5), ("norm_eps", 0.0), ("norm_eps", float("nan")),
    ("init_std", -0.02), ("init_std", 0.0), ("init_std", float("inf")),
])
def test_model_numbers_that_break_the_model_are_refused(field, value):
    """rope_theta <= 0 or a negative norm_eps gave NaN logits from step 0; a negative init_std crashed in
    torch's normal_ with a traceback."""
    with pytest.raises(FelixError, match=f"run.yaml: model: {field} must be positive and finite"):
        config_from_dict({"model": MODEL | {field: value}, "train": TRAIN}, "run.yaml")


def test_ordinary_model_numbers_still_load_and_give_finite_logits():
    model = MODEL | {"rope_theta": 500000.0, "norm_eps": 1e-6, "init_std": 0.01}
    cfg = config_from_dict({"model": model, "train": TRAIN})
    assert torch.isfinite(FelixLM(cfg.model)(torch.randint(0, 64, (1, 16)))).all()


@pytest.mark.parametrize(("section", "field", "value"), [
    ("model", "n_kv_heads", 0),  # read as n_heads by `n_kv_heads or n_heads`: silently multi-head
    ("quail", "gamma", float("nan")),  # NaN compares False with every bound
    ("quail", "margin", float("inf")),
    ("train", "eps", float("inf")),  # AdamW's update becomes 0/inf
])
def test_a_zero_head_count_and_non_finite_weights_are_refused(section, field, value):
    raw = {"model": dict(MODEL), "train": dict(TRAIN), "quail": {}}
    raw[section][field] = value
    with pytest.raises(FelixError, match=rf"{section}.*{field}"):
        config_from_dict(raw, "run.yaml")


def test_an_override_typo_names_the_override_and_the_key_it_meant(tmp_path, capsys):
    """`train.lrr=1e-3` was blamed on the YAML file (`tiny.yaml: train.lrr: unknown key`); on a resume, on the run's
    config.yaml, which the user never edited."""
    from felix.cli import main

    run = tmp_path / "run.yaml"
    run.write_text("train:\n  seq_len: 16\n", encoding="utf-8")
    with pytest.raises(FelixError) as caught:
        load_config(run, ["train.lr=1e-3", "train.lrr=1e-3"])
    assert str(caught.value) == "invalid config\noverride train.lrr=1e-3: unknown key train.lrr; did you mean train.lr?"
    with pytest.raises(FelixError, match=r"^invalid config\noverride trian.lr=2: unknown key trian; did you mean "
                                         r"train\?$"):
        load_config(run, ["trian.lr=2"])
    # a bad value an override gave names it; a section's own check names the file and the override
    with pytest.raises(FelixError, match=r"override train.max_steps=x: train.max_steps: Input should be"):
        load_config(run, ["train.max_steps=x"])
    with pytest.raises(FelixError, match=r"run.yaml with override train.lr=-1: train: lr must be positive"):
        load_config(run, ["train.lr=-1"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("train:\n  seq_len: 16\n", encoding="utf-8")
    assert main(["train", "--out", str(out), "--resume", "train.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "override train.lrr=1e-3: unknown key train.lrr; did you mean train.lr?" in err and "config.yaml" not in err


def test_an_unknown_key_in_a_file_says_the_key_it_meant(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  d_modle: 64\ntrain:\n  micro_batchsize: 2\n  colour: red\n", encoding="utf-8")
    with pytest.raises(FelixError) as caught:
        load_config(run)
    assert str(caught.value).splitlines()[1:] == [
        f"{run}: model.d_modle: unknown key; did you mean model.d_model?",
        f"{run}: train.micro_batchsize: unknown key; did you mean train.micro_batch_size?",
        f"{run}: train.colour: unknown key"]  # nothing near
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - name: a\n    shards: a\n    wieght: 1\n", encoding="utf-8")
    with pytest.raises(FelixError, match=r"sources.0.wieght: unknown key; did you mean sources.0.weight\?"):
        DataMix.load(mix)


def test_one_quail_section_given_to_two_configs_sizes_each_by_its_own_micro_batch():
    """Before: resolving quail.calibration_sequences wrote into the QuailConfig given, so a second FelixConfig
    built with it took the first one's micro-batch (3 x 2 windows where its own 5 x 2 were meant)."""
    from felix.config import FelixConfig, QuailConfig, TrainConfig

    quail = QuailConfig()
    small, large = (FelixConfig(train=TrainConfig(micro_batch_size=mb), quail=quail) for mb in (3, 5))
    assert (small.quail.calibration_sequences, large.quail.calibration_sequences) == (6, 10)
    assert quail.calibration_sequences is None
    assert FelixConfig(quail=QuailConfig(calibration_sequences=7)).quail.calibration_sequences == 7
