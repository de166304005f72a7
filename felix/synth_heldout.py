"""The documents that validation splits on disk hold out, so that FinePhrase neither rephrases nor mixes them.

`synth.sources` are usually data-mix sources too (the stdlib corpus's docs.jsonl): a document of their val
split that the synth mix took, or rephrased, would be trained on after all. Each named shard directory's val
split is decoded with the tokenizer it was written with, cut into documents at the end-of-text token, and
matched to source documents by a hash of their whitespace-normalised text. What is on disk counts: the rule
that chose the split is not recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from felix.datamix import DataMix
from felix.errors import FelixError
from felix.harvest_config import HarvestConfig
from felix.shards import SYNTH_MIX_MARKER, ShardSet
from felix.tokenizer import FelixTokenizer

# SYNTH_MIX_MARKER marks the shard directory of a synth mix. Its val split holds originals taken from
# synth.sources: reached through a data mix, it is the synth mix's own split, and holding those out too would
# drop them from the next mix (and change its split) every time it is made.


def text_key(text: str) -> str:
    """What documents are matched by: a hash of the text with whitespace runs collapsed and ends stripped
    (the shards hold a source's text as read, synth a stripped copy)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


@dataclass
class Heldout:
    """Hashes of the held-out documents, and where they came from (for the report)."""

    keys: set[str] = field(default_factory=set)
    val_documents: dict[str, int] = field(default_factory=dict)  # shard directory -> val documents read
    skipped: list[str] = field(default_factory=list)  # synth-mix shard directories a data mix named

    def describe(self) -> dict:
        return {"val_documents": dict(self.val_documents), "skipped_synth_mixes": list(self.skipped)}


def split_documents(shards: ShardSet, split: str, tok: FelixTokenizer) -> Iterator[str]:
    """The documents of `split`, decoded: each ends at the end-of-text token the shards put after it."""
    arrays = shards.arrays(split)
    if not arrays:
        return
    tokens = np.concatenate(arrays)
    start = 0
    for end in np.flatnonzero(tokens == tok.eot_id):
        yield tok.decode(tokens[start:end].tolist())
        start = int(end) + 1
    if start < len(tokens):  # not written by felix, but a last document without its end token is still one
        yield tok.decode(tokens[start:].tolist())


def _shard_dirs(cfg: HarvestConfig) -> list[tuple[Path, bool]]:
    """(shard directory, reached through a data mix) for every val split synth.heldout names."""
    h = cfg.synth.heldout
    assert h is not None
    dirs = [(s.shards, True) for m in h.mixes for s in DataMix.load(cfg.resolve(m)).sources]
    return dirs + [(cfg.resolve(d), False) for d in h.shards]


def load_heldout(cfg: HarvestConfig) -> Heldout | None:
    """The held-out documents of the val splits `synth.heldout` names; None when it names none."""
    h = cfg.synth.heldout
    if h is None:
        return None
    tok = FelixTokenizer.load(cfg.resolve(h.tokenizer))
    out = Heldout()
    for root, via_mix in _shard_dirs(cfg):
        key = str(root.resolve())
        if key in out.val_documents or key in out.skipped:
            continue
        if via_mix and (root / SYNTH_MIX_MARKER).is_file():
            out.skipped.append(key)
            continue
        shards = ShardSet.open(root, verify=False)
        if shards.tokenizer_sha256 != tok.sha256:
            raise FelixError(f"synth.heldout: {root} was written with another tokenizer than {tok.path}; name the "
                             f"one its shards were made with (synth.heldout.tokenizer)")
        n = 0
        for text in split_documents(shards, "val", tok):
            out.keys.add(text_key(text))
            n += 1
        out.val_documents[key] = n
    return out


def synth_mix_marker(mix: Path, config: Path | None) -> dict[str, str]:
    """The sidecar that marks a shard directory as a synth mix's (see SYNTH_MIX_MARKER), for write_shards to
    write with the shards: a crash between the two would leave the mix's val split looking held out."""
    info = {"mix": str(mix.resolve()), "config": str(config.resolve()) if config else None}
    return {SYNTH_MIX_MARKER: json.dumps(info, indent=1) + "\n"}
