"""Held-out text: windows from every mix source, and the mix-weighted NLL the splice budget reads."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from felix.config import ModelConfig
from felix.datamix import DataMix
from felix.errors import FelixError
from felix.heldout import HeldoutText, heldout_nll, source_nll
from felix.model import FelixLM
from felix.splice_data import heldout_text


def _ckpt(tiny_mix):
    """What heldout_text reads of a checkpoint: the config's mix path and where the checkpoint lies."""
    return SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(mix=str(tiny_mix.mix_path))),
                           path=Path(tiny_mix.root) / "run")


def _val_windows(tiny_mix, source: str, length: int) -> list[tuple[int, ...]]:
    shards = DataMix.load(tiny_mix.mix_path).open_shards(verify=False)[source]
    return [tuple(np.asarray(a[s : s + length]).tolist()) for a in shards.arrays("val")
            for s in range(0, len(a) - length, length)]


def test_heldout_text_draws_every_source_by_mix_weight(tiny_mix):
    text = heldout_text(_ckpt(tiny_mix), 8, 32)
    assert text.weights == pytest.approx({"code": 0.7, "prose": 0.3})
    for source, want in (("code", 6), ("prose", 2)):
        every = _val_windows(tiny_mix, source, 32)
        rows = [tuple(r) for r in text.windows[source].tolist()]
        assert len(rows) == min(want, len(every)) and set(rows) <= set(every)
        assert rows[0] == every[0] and rows[-1] == every[-1]  # spread over the whole split
    everything = heldout_text(_ckpt(tiny_mix), 10_000, 32)  # more than there is: all of each source, once
    for source in ("code", "prose"):
        rows = sorted(tuple(r) for r in everything.windows[source].tolist())
        assert rows == sorted(_val_windows(tiny_mix, source, 32))


def test_heldout_text_leaves_out_a_source_too_short_for_a_window(tiny_mix):
    shards = DataMix.load(tiny_mix.mix_path).open_shards(verify=False)
    longest = {s: max(len(a) for a in sh.arrays("val")) for s, sh in shards.items()}
    short, long = sorted(longest, key=longest.get)
    assert longest[short] < longest[long]
    text = heldout_text(_ckpt(tiny_mix), 8, longest[short])
    assert set(text.windows) == {long} and text.weights == {long: 1.0}
    with pytest.raises(FelixError, match="no val windows"):
        heldout_text(_ckpt(tiny_mix), 8, longest[long])
    with pytest.raises(FelixError, match="must be positive"):
        heldout_text(_ckpt(tiny_mix), 0, 32)


def test_heldout_nll_weights_each_source_mean_by_the_mix():
    torch.manual_seed(0)
    model = FelixLM(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=32,
                                splice_every=2, splice_rank=4)).eval()
    windows = {"a": torch.randint(0, 64, (5, 17)), "b": torch.randint(0, 64, (40, 17))}
    text = HeldoutText(windows, {"a": 0.8, "b": 0.2})

    def mean_nll(tokens):
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        return float(F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten()))

    by_hand = {s: mean_nll(t) for s, t in windows.items()}
    assert source_nll(model, text) == pytest.approx(by_hand, rel=1e-5)
    assert heldout_nll(model, text) == pytest.approx(0.8 * by_hand["a"] + 0.2 * by_hand["b"], rel=1e-5)
    # a plain mean over all 45 windows would weigh b 8/9: that is not the mix's perplexity
    assert not math.isclose(heldout_nll(model, text), mean_nll(torch.cat([windows["a"], windows["b"]])), rel_tol=1e-4)
    assert heldout_nll(model, windows["b"]) == pytest.approx(by_hand["b"], rel=1e-5)  # a bare tensor: one source


@pytest.mark.parametrize("windows, weights", [({}, {}), ({"a": torch.zeros(1, 4)}, {"a": 0.5}),
                                              ({"a": torch.zeros(1, 4)}, {"b": 1.0})])
def test_heldout_text_rejects_inconsistent_weights(windows, weights):
    with pytest.raises(ValueError):
        HeldoutText(windows, weights)
