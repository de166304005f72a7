"""The documents that validation splits on disk hold out, so that FinePhrase neither rephrases nor mixes them.

`synth.sources` are usually data-mix sources too (the stdlib corpus's docs.jsonl): a document of their val
split that the synth mix took, or rephrased, would be trained on after all. Each named shard directory's val
split is decoded with the tokenizer it was written with, cut into documents at the end-of-text token, and
matched to source documents by a hash of their whitespace-normalised text. What is on disk counts: the rule
that chose the split is not recomputed.

Near copies (a val document edited, cut, or inside a longer one) are found by word n-grams, as language-model
decontamination does (GPT-3's 13-grams): a source document is held out when at least `containment` of its
distinct n-grams, or of a val document's, are n-grams of the other (the smaller side is the one contained).
A single shared n-gram is not enough: licence headers and boilerplate would hold out every document that has
them. It is for a val document of at most 1/`containment` n-grams (13 or 14 words at the defaults): a source
that holds one of them holds that much of it. Documents of fewer than `ngram` words have no n-gram and match
exactly or not at all. The val split is
the small side: its n-grams are held as sorted 64-bit hashes (12 bytes each, with their document), and the
source documents are checked one at a time as they are read.
"""

from __future__ import annotations

import hashlib
import json
import re
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


_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it mod 2**64 loses nothing of the words before


def word_ngrams(text: str, n: int) -> np.ndarray:
    """The distinct word n-grams of `text` as sorted 64-bit hashes; words are runs of letters, digits and _,
    lowercased (case, punctuation and spacing do not matter). Empty when `text` has fewer than `n` words.
    The hashes hold within one process only (Python's string hash is seeded per process)."""
    words = _WORD.findall(text.lower())
    m = len(words) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64)
    w = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
    h = np.zeros(m, np.uint64)
    for j in range(n):  # a polynomial in the word hashes, mod 2**64 (uint64 arithmetic wraps)
        h = h * _MIX + w[j : j + m]
    return np.unique(h)


class NgramIndex:
    """The word n-grams of the val documents, to find the near copies of one of them (see the module docstring).
    `add` every val document, then `freeze` once before `holds`."""

    def __init__(self, n: int, containment: float):
        self.n, self.containment = n, containment
        self._parts: list[np.ndarray] = []
        self.hashes = np.empty(0, np.uint64)  # every distinct n-gram of every val document, sorted
        self.docs = np.empty(0, np.int32)  # the val document (index into sizes) each is of
        self.sizes = np.empty(0, np.int64)  # distinct n-grams per val document

    def add(self, text: str) -> None:
        if (grams := word_ngrams(text, self.n)).size:  # a shorter document matches exactly or not at all
            self._parts.append(grams)

    def freeze(self) -> None:
        if not self._parts:
            return
        self.sizes = np.array([len(g) for g in self._parts], np.int64)
        hashes = np.concatenate(self._parts)
        docs = np.repeat(np.arange(len(self._parts), dtype=np.int32), self.sizes)
        self._parts = []
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.docs = hashes[order], docs[order]

    def holds(self, text: str) -> bool:
        """Whether `text` is a near copy of a val document: containment of either in the other is reached."""
        grams = word_ngrams(text, self.n)
        if not grams.size or not self.hashes.size:
            return False
        lo = np.searchsorted(self.hashes, grams, side="left")
        counts = np.searchsorted(self.hashes, grams, side="right") - lo
        if not (total := int(counts.sum())):
            return False
        # the positions of every match: an n-gram several val documents share is one match in each
        starts = np.repeat(lo, counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        docs, shared = np.unique(self.docs[starts + within], return_counts=True)
        return bool(np.any(shared >= self.containment * np.minimum(len(grams), self.sizes[docs])))


@dataclass
class Heldout:
    """Hashes of the held-out documents, and where they came from (for the report)."""

    keys: set[str] = field(default_factory=set)
    val_documents: dict[str, int] = field(default_factory=dict)  # shard directory -> val documents read
    skipped: list[str] = field(default_factory=list)  # synth-mix shard directories a data mix named
    near: NgramIndex | None = None

    def match(self, text: str, key: str) -> str | None:
        """How a val document holds `text` (`key`: its text_key): "exact" (up to whitespace), "near" (a near
        copy either way), or None."""
        if key in self.keys:
            return "exact"
        return "near" if self.near is not None and self.near.holds(text) else None

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
    out = Heldout(near=NgramIndex(h.ngram, h.containment))
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
            out.near.add(text)
            n += 1
        out.val_documents[key] = n
    out.near.freeze()
    return out


def synth_mix_marker(mix: Path, config: Path | None) -> dict[str, str]:
    """The sidecar that marks a shard directory as a synth mix's (see SYNTH_MIX_MARKER), for write_shards to
    write with the shards: a crash between the two would leave the mix's val split looking held out."""
    info = {"mix": str(mix.resolve()), "config": str(config.resolve()) if config else None}
    return {SYNTH_MIX_MARKER: json.dumps(info, indent=1) + "\n"}
