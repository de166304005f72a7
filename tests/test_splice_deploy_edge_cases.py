"""Edge cases of deploying edits and of the splice data helpers: a damaged stored fold, a SpliceCore whose `a`
is all zeros, preservation windows drawn from a large mix, and an edit set that cannot be made as large as
asked."""

from __future__ import annotations

import json
import logging
import os
import struct
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from splice_helpers import NgramOracle

from felix.config import ModelConfig
from felix.datamix import DataMix, MixSource
from felix.errors import FelixError
from felix.model import FelixLM
from felix.shards import write_shards
from felix.splice_data import corpus_windows
from felix.splice_examples import Example
from felix.splice_fold import StackFold
from felix.splice_quant import PushRounding, gptq_requantizer, on_grid

# SpliceCore a 16x128 and b 64x16: both hold whole RQ4 blocks, as at the tiny splice tests' rank 16
SMALL = ModelConfig(vocab_size=512, n_layers=4, d_model=64, n_heads=4, d_ff=128, max_seq_len=64, splice_every=2,
                    splice_rank=16)


@pytest.fixture
def edited():
    """An untrained model whose SpliceCore holds unrounded values (as an edited artifact's stack leaves it),
    preservation windows and one edit's keys."""
    torch.manual_seed(0)
    model = FelixLM(SMALL).eval()
    with torch.no_grad():
        for core in model.splice_cores().values():
            core.b.normal_(std=0.05)
    preserve = torch.randint(0, SMALL.vocab_size, (8, 32))
    return model, preserve, [Example((5, 9, 17, 33, 2), 4)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _damage(store, key: str, how: str) -> None:
    """Flip a bit of, or write a NaN into, the first value of tensor `key` in a safetensors file."""
    data = bytearray(store.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start = 8 + n + json.loads(data[8 : 8 + n])[key]["data_offsets"][0]
    if how == "nan":
        data[start : start + 4] = struct.pack("<f", float("nan"))
    else:
        data[start + 2] ^= 0x10
    store.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "nan"])
def test_a_damaged_stored_fold_is_folded_again_not_served(edited, tmp_path, caplog, how):
    """The store is read by digest of the fold's inputs; a fold whose stored values were damaged since must
    not be served (a flipped bit served silently, a NaN failed the load without naming the file)."""
    model, preserve, edits = edited
    store = tmp_path / "fold.safetensors"
    fold = StackFold(preserve, "rq4", store=store).served(model, edits)
    assert fold is not None and on_grid(fold, "rq4")
    _damage(store, "0.layers.3.mlp.splice.b", how)
    with caplog.at_level(logging.WARNING, logger="felix.splice_fold"):
        again = StackFold(preserve, "rq4", store=store).served(model, edits)
    assert _same(again, fold)
    assert "damaged" in caplog.text and str(store) in caplog.text
    caplog.clear()  # the fold made again replaced the damaged one in the store
    with caplog.at_level(logging.WARNING, logger="felix.splice_fold"):
        assert _same(StackFold(preserve, "rq4", store=store).served(model, edits), fold)
    assert not caplog.text


def test_a_splicecore_whose_a_is_zero_is_folded_and_pushed(edited):
    """A layer whose `a` is all zeros (a server push that clears it) reads no input into `b`: the fold and
    `felix quantize`'s GPTQ rounding failed on the singular refit of `b` (every loader of the artifact with it)."""
    model, preserve, edits = edited
    with torch.no_grad():
        model.splice_cores()[1].a.zero_()
    b = model.splice_cores()[1].b.detach().clone()
    gptq_requantizer(preserve, edits, "rq4")(model)
    state = model.splice_state()
    assert on_grid(state, "rq4") and not state["layers.1.mlp.splice.a"].any()
    assert torch.equal(state["layers.1.mlp.splice.b"], PushRounding(preserve).format.fake_quant(b))
    # a pushed `b` under that zero `a` is weighed by nothing either: it is rounded plainly
    pushed = PushRounding(preserve)(model, "layers.1.mlp.splice.b", b * 2)
    assert on_grid({"layers.1.mlp.splice.b": pushed}, "rq4")


def test_preservation_windows_are_drawn_without_listing_every_window(tiny_mix, tmp_path):
    """Drawing the preservation windows listed every window of every train shard first: 2B tokens took 15 s
    and 1.8 GB to draw 256 (a felix-300m mix has tens of billions), on every load of an edited artifact. The
    draw itself must stay the same (the stored folds' digests read the windows)."""
    tok = tiny_mix.tokenizer
    docs = [" ".join(f"word{i} {d}" for i in range(40)) for d in range(30)]
    write_shards(docs, tok, tmp_path / "shards" / "small", val_fraction=0.0, shard_tokens=500)  # many files
    write_shards(docs[:2], tok, tmp_path / "shards" / "big", val_fraction=0.0)
    index_path = tmp_path / "shards" / "big" / "index.json"
    index = json.loads(index_path.read_text())
    big = 100_000_000  # tokens, in a sparse file: nothing is read but the windows drawn
    os.truncate(tmp_path / "shards" / "big" / index["splits"]["train"]["files"][0]["file"], 2 * big)
    index["splits"]["train"]["files"][0]["n_tokens"] = index["splits"]["train"]["n_tokens"] = big
    index_path.write_text(json.dumps(index))
    DataMix(sources=[MixSource(name="small", shards=Path("shards/small"), weight=1.0),
                     MixSource(name="big", shards=Path("shards/big"), weight=1.0)]).write(tmp_path / "mix.yaml")
    ckpt = SimpleNamespace(path=tmp_path / "run", config=SimpleNamespace(data=SimpleNamespace(
        mix=str(tmp_path / "mix.yaml")), model=SimpleNamespace(vocab_size=tok.vocab_size)))
    tracemalloc.start()
    try:
        windows = corpus_windows(ckpt, "train", 64, 16, seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MB"
    # the draw is the one made from the list of every window: the small source's pooled files, then the big one's
    rng = np.random.default_rng(1)
    arrays = DataMix.load(tmp_path / "mix.yaml").open_shards(verify=False)["small"].arrays("train")
    assert len(arrays) > 3
    spans = [(a, s) for a in arrays for s in range(0, len(a) - 16, 16)]
    picks = sorted(rng.choice(len(spans), size=64, replace=False).tolist())
    rows = [np.asarray(spans[i][0][spans[i][1] : spans[i][1] + 16], dtype=np.int64) for i in picks]
    rng.choice(big // 16 - 1, size=64, replace=False)  # the big source's draw: windows of zeros
    rows += [np.zeros(16, dtype=np.int64)] * 64
    rng.shuffle(rows)
    assert torch.equal(windows, torch.from_numpy(np.stack(rows[:64])))


def test_make_edits_refuses_to_return_fewer_edits_than_asked(tmp_path):
    """Held facts whose targets have no counterfactual (here all share one identifier): make_edits returned
    fewer requests than asked, none at all here, and `make-edits` wrote an empty edit file with success."""
    from felix.splice_data import make_edits
    from felix.tokenizer import train_tokenizer

    docs = ["\n".join(f"    result_{d}_{i} = shared" for i in range(12)) for d in range(4)]
    (tmp_path / "docs.txt").write_text("\n".join(docs), encoding="utf-8")
    tok = train_tokenizer([tmp_path / "docs.txt"], 320, tmp_path / "tok.json")
    oracle = NgramOracle(tok, docs, SMALL.model_copy(update={"max_seq_len": 4096}))
    with pytest.raises(FelixError, match="0 of the 3"):
        make_edits(oracle, tok, docs, 3, n_neutral=2)
