"""MixLoader and DataMix against bad input: a loader state from another stream, malformed states, weights
that overflow. Each is a clear FelixError rather than silently wrong data or a traceback."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from felix.dataloader import MixLoader
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.shards import ShardSet


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


def _reweighted(mix: DataMix, tmp_path, weights: dict[str, float]) -> DataMix:
    path = tmp_path / "reweighted.yaml"
    DataMix(sources=[s.model_copy(update={"weight": weights[s.name]}) for s in mix.sources]).write(path)
    return DataMix.load(path)


def test_new_weights_on_resume_apply_from_there_on(mix, tmp_path):
    """Shares used to count from sample 0, so after 2,000 samples at 0.7/0.3 a resumed 0.2/0.8 mix drew prose
    alone for ~1,250 samples (and code not at all) until the totals caught up."""
    state = saved_state(mix)  # 400 samples at 0.7 / 0.3
    before = MixLoader(mix, "train", 32, 4, seed=0)
    before.load_state_dict(state)
    loader = MixLoader(_reweighted(mix, tmp_path, {"code": 1.0, "prose": 4.0}), "train", 32, 4, seed=0)
    with pytest.warns(UserWarning, match=r"weights changed.*apply from sample 400"):
        loader.load_state_dict(state)
    start = dict(state["counts"])
    loader.advance(100)
    drawn = {n: c - start[n] for n, c in loader.state_dict()["counts"].items()}
    assert drawn == {"code": 20, "prose": 80}
    # each source continues its own shuffle: the next prose window is the one the old mix would have read next
    again = MixLoader(_reweighted(mix, tmp_path, {"code": 1.0, "prose": 4.0}), "train", 32, 4, seed=0)
    with pytest.warns(UserWarning):
        again.load_state_dict(state)
    prose = again.names.index("prose")
    k = again.counts[prose]
    assert again.sources[prose].window(k).tolist() == before.sources[prose].window(k).tolist()
    # and a checkpoint written after the switch resumes under the new weights without a warning
    saved = json.loads(json.dumps(loader.state_dict()))
    loader.advance(50)
    resumed = MixLoader(_reweighted(mix, tmp_path, {"code": 1.0, "prose": 4.0}), "train", 32, 4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(saved)
    resumed.advance(50)
    assert resumed.state_dict() == loader.state_dict()


@pytest.mark.parametrize("field, value", [("weights", {"code": "0.7", "prose": 0.3}), ("weights", [0.7, 0.3]),
                                          ("base", {"sample": 500, "counts": {"code": 400, "prose": 100}}),
                                          ("base", {"sample": 1, "counts": {"code": 0, "prose": 0}})])
def test_malformed_weights_or_base_are_clear_errors(mix, field, value):
    state = saved_state(mix) | {field: value}
    with pytest.raises(FelixError, match=f"loader state is malformed .*'{field}'"):
        MixLoader(mix, "train", 32, 4, seed=0).load_state_dict(state)


def test_a_source_whose_shards_changed_since_the_position_is_named_in_a_warning(mix):
    state = saved_state(mix)
    state["windows"]["prose"] += 7  # as if prose had been re-sharded with fewer documents
    with pytest.warns(UserWarning, match=r"shards of \['prose'\] changed"):
        MixLoader(mix, "train", 32, 4, seed=0).load_state_dict(state)


def test_a_whole_mix_error_names_its_place_plainly(tmp_path, tiny_mix):
    """It read `invalid data mix: : Value error, duplicate source names`."""
    path = tmp_path / "dupes.yaml"
    code = tiny_mix.root / "shards" / "code"
    path.write_text(f"sources:\n - {{name: a, shards: {code}, weight: 1}}\n - {{name: a, shards: {code}, weight: 1}}\n")
    with pytest.raises(FelixError) as err:
        DataMix.load(path)
    assert str(err.value) == f"{path}: invalid data mix: (top level): duplicate source names ['a']"


def test_token_ids_past_the_vocabulary_name_the_shard(tiny_mix, tmp_path):
    """A damaged shard read without checksums (data.verify_checksums=false) reached the model: a bare IndexError
    in the embedding, on a GPU a device assert naming nothing."""
    shutil.copytree(tiny_mix.root / "shards" / "code", tmp_path / "code")
    shard = tmp_path / "code" / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    vocab = ShardSet.open(tmp_path / "code").meta["vocab_size"]
    ids[len(ids) // 2:] = vocab + 7  # same size: only the checksum would tell
    ids.tofile(shard)
    path = tmp_path / "mix.yaml"
    DataMix(sources=[MixSource(name="code", shards=tmp_path / "code", weight=1.0)]).write(path)
    loader = MixLoader(DataMix.load(path), "train", 32, 4, seed=0, verify=False)
    with pytest.raises(FelixError, match=rf"train-00000\.bin: token id {vocab + 7} at position \d+ is outside the "
                                         rf"vocabulary \(0\.\.{vocab - 1}\)"):
        for _ in range(100):
            loader.next_batch()
