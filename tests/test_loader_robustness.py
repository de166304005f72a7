"""MixLoader and DataMix against bad input: a loader state from another stream, malformed states, weights
that overflow. Each is a clear FelixError rather than silently wrong data or a traceback."""

from __future__ import annotations

import json

import pytest

from felix.dataloader import MixLoader
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError


@pytest.fixture
def mix(tiny_mix) -> DataMix:
    return DataMix.load(tiny_mix.mix_path)


def saved_state(mix: DataMix, seed: int = 0) -> dict:
    """A mid-epoch position as trainer.json stores it (keys sorted)."""
    loader = MixLoader(mix, "train", 32, 4, seed=seed)
    loader.advance(400)
    return json.loads(json.dumps(loader.state_dict(), sort_keys=True))


def test_a_state_from_another_seed_is_refused(mix):
    """Another seed reshuffles every source's current epoch: the saved counts would then repeat some windows
    of that epoch and skip others."""
    with pytest.raises(FelixError, match="seed 0, this run uses 1"):
        MixLoader(mix, "train", 32, 4, seed=1).load_state_dict(saved_state(mix))


def test_a_state_from_the_mix_in_another_order_is_refused(mix, tmp_path):
    """A source's shuffle is seeded by its place in the mix, so reordering the YAML changes the stream."""
    path = tmp_path / "reordered.yaml"
    DataMix(sources=list(reversed(mix.sources))).write(path)
    with pytest.raises(FelixError, match="order"):
        MixLoader(DataMix.load(path), "train", 32, 4, seed=0).load_state_dict(saved_state(mix))


def test_a_state_without_seed_and_order_still_resumes(mix):
    """States written before the seed and source order were stored continue as before."""
    ref = MixLoader(mix, "train", 32, 4, seed=0)
    ref.advance(400)
    state = {k: v for k, v in ref.state_dict().items() if k not in ("seed", "sources")}
    resumed = MixLoader(mix, "train", 32, 4, seed=0)
    resumed.load_state_dict(state)
    assert resumed.next_batch()[0].equal(ref.next_batch()[0])


@pytest.mark.parametrize("state", ["sample 3", ["code", "prose"], None,
                                   {"sample": 3, "counts": {"code": "2", "prose": 1}, "seq_len": 32},
                                   {"sample": 3, "counts": {"code": None, "prose": 1}, "seq_len": 32},
                                   {"sample": 3, "counts": {"code": 1.5, "prose": 1.5}, "seq_len": 32}])
def test_malformed_state_values_are_clear_errors(mix, state):
    loader = MixLoader(mix, "train", 32, 4, seed=0)
    with pytest.raises(FelixError, match="loader state is malformed"):
        loader.load_state_dict(state)
    assert loader.state_dict()["sample"] == 0  # the position is untouched


def test_weights_whose_sum_overflows_name_the_mix_file(tiny_mix, tmp_path):
    """Each weight is finite, but their sum is inf: every share would be 0 and the loader divide by zero."""
    path = tmp_path / "mix.yaml"
    code, prose = (tiny_mix.root / "shards" / n for n in ("code", "prose"))
    DataMix.model_construct(sources=[MixSource(name="code", shards=code, weight=1.5e308),
                                     MixSource(name="prose", shards=prose, weight=1.5e308)]).write(path)
    with pytest.raises(FelixError, match=f"{path}.*weights add up"):
        DataMix.load(path)
