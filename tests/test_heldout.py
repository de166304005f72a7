"""Held-out text: windows from every mix source, and the mix-weighted NLL the splice budget reads."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from felix.config import ModelConfig
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.heldout import HeldoutText, heldout_nll, source_nll
from felix.model import FelixLM
from felix.shards import write_shards
from felix.splice_data import NextTokenShares, corpus_documents, corpus_windows, heldout_text


def _ckpt(tiny_mix, vocab_size: int = 512, mix: Path | None = None, path: Path | None = None):
    """What heldout_text reads of a checkpoint: the config's mix path and model.vocab_size (the tiny mix's
    tokenizer has 512 tokens), and where the checkpoint lies."""
    return SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(mix=str(mix or tiny_mix.mix_path)),
                                                  model=SimpleNamespace(vocab_size=vocab_size)),
                           path=path or Path(tiny_mix.root) / "run")


def _val_windows(tiny_mix, source: str, length: int) -> list[tuple[int, ...]]:
    shards = DataMix.load(tiny_mix.mix_path).open_shards(verify=False)[source]
    return [tuple(np.asarray(a[s : s + length]).tolist()) for a in shards.arrays("val")
            for s in range(0, len(a) - length + 1, length)]


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
    text = heldout_text(_ckpt(tiny_mix), 8, longest[short] + 1)
    assert set(text.windows) == {long} and text.weights == {long: 1.0}
    with pytest.raises(FelixError, match="no val windows"):
        heldout_text(_ckpt(tiny_mix), 8, longest[long] + 1)
    with pytest.raises(FelixError, match="must be positive"):
        heldout_text(_ckpt(tiny_mix), 0, 32)


def test_a_split_cut_into_whole_windows_keeps_its_last_one(tiny_mix):
    """A val array exactly k windows long gives k windows: one exactly a window long is one, not none."""
    shards = DataMix.load(tiny_mix.mix_path).open_shards(verify=False)
    arrays = {s: sh.arrays("val") for s, sh in shards.items()}
    short, long = sorted(arrays, key=lambda s: max(len(a) for a in arrays[s]))
    length = max(len(a) for a in arrays[short])
    text = heldout_text(_ckpt(tiny_mix), 10_000, length)
    whole = [a for a in arrays[short] if len(a) == length]
    assert whole and sorted(tuple(r) for r in text.windows[short].tolist()) == sorted(
        tuple(np.asarray(a).tolist()) for a in whole)
    half = length // 2
    halves = heldout_text(_ckpt(tiny_mix), 10_000, half).windows[short]
    assert len(halves) == sum(len(a) // half for a in arrays[short])
    assert tuple(np.asarray(whole[0][half : 2 * half]).tolist()) in {tuple(r) for r in halves.tolist()}


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


@pytest.mark.parametrize("windows, weights, match", [
    ({}, {}, "same, non-empty set of sources"),
    ({"a": torch.zeros(1, 4)}, {"a": 0.5}, "weights must sum to 1"),
    ({"a": torch.zeros(1, 4)}, {"b": 1.0}, "same, non-empty set of sources")])
def test_heldout_text_rejects_inconsistent_weights(windows, weights, match):
    with pytest.raises(ValueError, match=match):
        HeldoutText(windows, weights)


def test_corpus_windows_pool_a_source_written_as_many_shard_files(tiny_mix, tmp_path):
    """A source split into many shard files counts once: its share of a train draw is that of a source with
    one file and as many windows, not one share per file."""
    tok = tiny_mix.tokenizer
    for name, shard_tokens in (("code", 1_000), ("prose", 2**24)):
        lines = (tiny_mix.root / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        docs = [json.loads(line)["text"] for line in lines]
        write_shards(docs, tok, tmp_path / "shards" / name, val_fraction=0.15, seed=3, shard_tokens=shard_tokens)
    DataMix(sources=[MixSource(name=s, shards=Path("shards") / s, weight=0.5) for s in ("code", "prose")]).write(
        tmp_path / "mix.yaml")
    ckpt = _ckpt(tiny_mix, mix=tmp_path / "mix.yaml", path=tmp_path / "run")
    shards = DataMix.load(tmp_path / "mix.yaml").open_shards(verify=False)
    assert len(shards["code"].arrays("train")) >= 20 and len(shards["prose"].arrays("train")) == 1

    def windows(source: str, split: str) -> list[tuple[int, ...]]:
        return [tuple(np.asarray(a[s : s + 32]).tolist()) for a in shards[source].arrays(split)
                for s in range(0, len(a) - 32 + 1, 32)]

    code, prose = set(windows("code", "train")), set(windows("prose", "train"))
    assert min(len(code), len(prose)) >= 64
    rows = [tuple(r) for r in corpus_windows(ckpt, "train", 64, 32).tolist()]
    n_code = sum(r in code for r in rows)
    assert len(rows) == 64 and set(rows) <= code | prose
    assert 20 <= n_code <= 44  # 64 of 64 + 64 candidates; one draw per shard file would give ~62
    val = corpus_windows(ckpt, "val", 10_000, 32)
    assert len(val) == len(windows("code", "val")) + len(windows("prose", "val"))


def test_shards_written_with_a_bigger_tokenizer_than_the_checkpoints_are_named(tiny_mix):
    """Before: the splice tools read the mix's token ids unchecked; an id past the checkpoint's embedding
    (the mix re-sharded with a bigger tokenizer since) was a bare IndexError, on a GPU a device assert."""
    shards = DataMix.load(tiny_mix.mix_path).open_shards(verify=False)
    assert all(max(int(np.max(a)) for a in s.arrays(split)) >= 300
               for s in shards.values() for split in ("train", "val"))
    ckpt = _ckpt(tiny_mix, vocab_size=300)  # the shards' tokenizer has 512 tokens
    where = re.escape(str(ckpt.path))
    bad_id = (rf"(code|prose)/(train|val)-\d{{5}}\.bin: token id (3\d\d|4\d\d|50\d|51[01]) at position \d+ is "
              rf"outside the vocabulary \(0\.\.299\) of checkpoint {where} \(model\.vocab_size 300\): shards "
              rf"written with a bigger tokenizer")
    for read in (lambda: heldout_text(ckpt, 10_000, 32), lambda: corpus_windows(ckpt, "val", 10_000, 32),
                 lambda: corpus_windows(ckpt, "train", 10_000, 32),
                 lambda: corpus_documents(ckpt, tiny_mix.tokenizer),
                 lambda: NextTokenShares.of_checkpoint(ckpt, 300)):
        with pytest.raises(FelixError, match=bad_id):
            read()
    assert len(heldout_text(_ckpt(tiny_mix), 8, 32).windows) == 2  # the checkpoint's own vocabulary reads
