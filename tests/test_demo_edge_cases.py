"""`felix demo` edge cases: failed first attempts and arguments refused before any work."""

from __future__ import annotations

import json

import pytest

from felix.demo import prepare_data, run_demo
from felix.errors import FelixError


def test_a_data_stage_that_failed_leaves_the_directory_usable_with_other_data(tmp_path):
    # a vocabulary too small for the bytes and special tokens fails after the corpus, before any tokenizer
    with pytest.raises(FelixError, match="vocab_size"):
        prepare_data(tmp_path, 100, 30_000, 0, {})
    assert not (tmp_path / "tokenizer.json").exists()
    # asked again with one that fits, the demo builds it rather than refusing the failed attempt's record
    prepare_data(tmp_path, 300, 30_000, 0, {})
    assert json.loads((tmp_path / "data.json").read_text())["vocab_size"] == 300
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "shards" / "code" / "index.json").is_file()
    # once a tokenizer holds the data, other data is refused as before
    with pytest.raises(FelixError, match="data.json: an earlier demo here built its data"):
        prepare_data(tmp_path, 400, 30_000, 0, {})


def test_a_facts_weight_out_of_range_is_refused_before_the_directory_is_made(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(FelixError, match=r"facts weight must be in \[0, 1\)"):
        run_demo(out, facts_weight=1.0, progress=False)
    assert not out.exists()  # no wall_time.json counting a run that did nothing
