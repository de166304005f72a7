"""MixLoader: determinism, exact resume, rank split equivalence, mix ratios."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.dataloader import MixLoader, window_ids
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError


@pytest.fixture
def mix(tiny_mix) -> DataMix:
    return DataMix.load(tiny_mix.mix_path)


def batches(loader: MixLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(n)]


def test_targets_are_inputs_shifted_by_one(mix):
    x, y = MixLoader(mix, "train", 32, 4, seed=0).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_deterministic_per_seed(mix):
    a, b = MixLoader(mix, "train", 32, 4, seed=0), MixLoader(mix, "train", 32, 4, seed=0)
    c = MixLoader(mix, "train", 32, 4, seed=1)
    xa, xb, xc = batches(a, 3), batches(b, 3), batches(c, 3)
    assert all(torch.equal(p, q) for p, q in zip(xa, xb, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc, strict=True))


@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_resume_from_state_continues_exactly(mix, k):
    ref = MixLoader(mix, "train", 32, 4, seed=0)
    batches(ref, k)
    state = ref.state_dict()
    expected = batches(ref, 5)
    resumed = MixLoader(mix, "train", 32, 4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(batches(resumed, 5), expected, strict=True))


def test_ranks_and_accumulation_see_the_global_batch(mix):
    whole = MixLoader(mix, "train", 32, 4, seed=0)
    ranks = [MixLoader(mix, "train", 32, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    halves = MixLoader(mix, "train", 32, 2, seed=0)
    for _ in range(6):
        x = whole.next_batch()[0]
        assert torch.equal(x, torch.cat([r.next_batch()[0] for r in ranks]))
        assert torch.equal(x, torch.cat([halves.next_batch()[0], halves.next_batch()[0]]))


def test_actual_ratios_track_targets_and_sources_cycle_epochs(mix):
    loader = MixLoader(mix, "train", 32, 8, seed=0)
    batches(loader, 500)
    tokens = loader.tokens_by_source()
    total = sum(tokens.values())
    for name, target in mix.targets().items():
        assert tokens[name] / total == pytest.approx(target, abs=0.01)
    # prose is small: it wraps into a new, differently ordered epoch
    assert loader.epochs_by_source()["prose"] > 1.0
    prose = loader.sources[1]
    first = [tuple(prose.window(k)) for k in range(8)]
    second = [tuple(prose.window(prose.n_windows + k)) for k in range(8)]
    assert first != second


def test_an_epoch_visits_every_window_once(mix, tiny_mix):
    loader = MixLoader(mix, "val", 16, 1, seed=0)
    src = loader.sources[1]
    windows = [tuple(src.window(k)) for k in range(src.n_windows)]
    stream = np.concatenate(src.arrays)
    assert sorted(windows) == sorted(tuple(stream[i * 16: i * 16 + 17]) for i in range(src.n_windows))


def test_too_short_source_and_mismatched_state_are_errors(mix):
    with pytest.raises(FelixError, match="fewer than one window"):
        MixLoader(mix, "val", 100_000, 1, seed=0)
    loader = MixLoader(mix, "train", 32, 1, seed=0)
    with pytest.raises(FelixError, match="seq_len"):
        loader.load_state_dict({"sample": 3, "counts": {"code": 2, "prose": 1}, "seq_len": 64})
    with pytest.raises(FelixError, match="sources"):
        loader.load_state_dict({"sample": 3, "counts": {"web": 3}, "seq_len": 32})


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_concatenate_to_the_single_process_batch(mix, world_size):
    whole = MixLoader(mix, "train", 16, 2 * world_size, seed=4)
    ranks = [MixLoader(mix, "train", 16, 2, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(5):
        x, y = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert all(r.state_dict() == whole.state_dict() for r in ranks)


def test_a_ddp_state_resumes_in_a_single_process(mix):
    """The state is global: a checkpoint from 2 ranks continues the same stream in one process."""
    ranks = [MixLoader(mix, "train", 16, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        for r in ranks:
            r.next_batch()
    single = MixLoader(mix, "train", 16, 6, seed=2)
    single.load_state_dict(json.loads(json.dumps(ranks[0].state_dict())))  # as stored in trainer.json
    assert torch.equal(single.next_batch()[0], torch.cat([r.next_batch()[0] for r in ranks]))


def test_ratios_track_three_weights_closely(tiny_mix, tmp_path):
    code = tiny_mix.root / "shards" / "code"
    path = tmp_path / "mix.yaml"
    for n in "abc":  # a mix names each shard directory once
        shutil.copytree(code, tmp_path / n)
    DataMix(sources=[MixSource(name=n, shards=tmp_path / n, weight=w)
                     for n, w in [("a", 5), ("b", 3), ("c", 2)]]).write(path)
    loader = MixLoader(DataMix.load(path), "train", 16, 1, seed=0)
    for n in range(1, 301):
        loader.advance(1)
        # the lag rule keeps every source within one sample of its target count at every step
        assert all(abs(c - w * n) < 1 for c, w in zip(loader.counts, (0.5, 0.3, 0.2), strict=True))
    drawn = loader.tokens_by_source()
    assert {k: v / sum(drawn.values()) for k, v in drawn.items()} == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2},
                                                                                  abs=0.01)


def test_state_is_small_json_and_inconsistent_states_are_refused(mix):
    loader = MixLoader(mix, "train", 32, 4, seed=0)
    batches(loader, 3)
    state = loader.state_dict()
    assert state == {"sample": 12, "counts": {"code": 8, "prose": 4}, "seq_len": 32, "seed": 0,
                     "sources": ["code", "prose"], "weights": {"code": 0.7, "prose": 0.3},
                     "windows": {"code": loader.sources[0].n_windows, "prose": loader.sources[1].n_windows},
                     "base": {"sample": 0, "counts": {"code": 0, "prose": 0}}}
    assert len(json.dumps(state)) < 300
    with pytest.raises(FelixError, match="inconsistent"):
        loader.load_state_dict({"sample": 5, "counts": {"code": 1, "prose": 1}, "seq_len": 32})
    fresh = MixLoader(mix, "train", 32, 4, seed=0)
    fresh.load_state_dict({})  # an empty state is the start
    assert fresh.state_dict()["sample"] == 0


def test_epochs_restart_with_a_new_order_after_exhaustion(mix):
    loader = MixLoader(mix, "val", 16, 1, seed=0)
    src = loader.sources[1]
    n = src.n_windows
    epoch0 = sorted(tuple(src.window(k)) for k in range(n))
    epoch1 = [tuple(src.window(n + k)) for k in range(n)]
    assert sorted(epoch1) == epoch0 and epoch1 != [tuple(src.window(k)) for k in range(n)]


def test_validation_skips_a_source_too_short_for_one_window(mix):
    val = {s.name: s for s in MixLoader(mix, "val", 16, 1, seed=0).sources}
    shortest = min(val, key=lambda n: val[n].n_windows)
    seq = val[shortest].n_windows * 16 + 16  # one window too long for the shorter source only
    assert max(v.n_windows for v in val.values()) * 16 > seq + 1
    with pytest.raises(FelixError, match=f"source '{shortest}'"):
        MixLoader(mix, "val", seq, 1, seed=0)
    loader = MixLoader(mix, "val", seq, 2, seed=0, skip_short=True)
    assert loader.skipped == [shortest] and shortest not in loader.names
    x, _ = loader.next_batch()
    assert x.shape == (2, seq)


def test_malformed_state_is_a_clear_error(mix):
    loader = MixLoader(mix, "train", 16, 2, seed=0)
    for state in ({"sample": 3}, {"counts": {"code": 1}, "sample": "3"}, {"counts": [1, 2], "sample": 3}):
        with pytest.raises(FelixError, match="loader state is malformed"):
            loader.load_state_dict(state)


@given(n=st.integers(1, 50_000), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_the_int32_window_order_is_the_order_earlier_checkpoints_were_saved_against(n, seed, epoch):
    """A checkpoint's loader position counts windows in `permutation(n)`'s order (int64, before 2026-12-05); the
    int32 ids must shuffle into that same order, or a resumed run would repeat some windows and skip others."""
    before = np.random.default_rng([seed, 1, epoch]).permutation(n)
    now = np.random.default_rng([seed, 1, epoch]).permutation(window_ids(n))
    assert now.dtype == np.int32 and np.array_equal(now, before)
