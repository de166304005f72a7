"""Deduplicate FinePhrase output and blend it with original text into one source for the data mix.

Near-duplicates (a teacher that answers two similar documents alike, two teachers that agree word for
word) are found with MinHash over word 5-grams and LSH banding; among a near-duplicate group the first
text in a stable order is kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from felix.atomic import atomic_path
from felix.corpus import json_records
from felix.errors import FelixError
from felix.harvest_config import HarvestConfig
from felix.harvest_store import HarvestStore
from felix.shards import ShardSet, write_shards
from felix.synth import heldout_report, select_documents, synth_job
from felix.synth_heldout import synth_mix_marker
from felix.tokenizer import FelixTokenizer

_WORD = re.compile(r"\w+")
_MERSENNE = np.uint64((1 << 61) - 1)
NUM_PERM, BANDS = 64, 16  # 16 bands of 4 rows: pairs above ~0.6 Jaccard nearly always share a band


def shingles(text: str, n: int = 5) -> set[int]:
    """Hashes of the lower-cased word n-grams of `text` (the whole text when it is shorter)."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 4 for g in grams}


def _permutations(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of minhash's NUM_PERM hash functions for `seed`."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MERSENNE), NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), NUM_PERM, dtype=np.uint64)
    return a, b


def _minhash(sh: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.fromiter(sh, dtype=np.uint64, count=len(sh)) % _MERSENNE
    # (a*x + b) mod p without overflow: split x into 30-bit halves.
    hi, lo = x >> np.uint64(30), x & np.uint64((1 << 30) - 1)
    ah = (a[:, None] * hi[None, :]) % _MERSENNE
    ah = (ah * np.uint64(1 << 30)) % _MERSENNE
    al = (a[:, None] * lo[None, :]) % _MERSENNE
    return ((ah + al + b[:, None]) % _MERSENNE).min(axis=1)


def minhash(sh: set[int], seed: int = 0) -> np.ndarray:
    """A NUM_PERM-long MinHash signature (universal hashing mod a Mersenne prime)."""
    return _minhash(sh, *_permutations(seed))


def _shared_bands(sigs: np.ndarray) -> np.ndarray:
    """Per text and band, an id for the group of texts whose signatures agree on that band, or -1 when no other
    text's does (the text can be no one's candidate there). Ids are unique across bands."""
    n, rows = len(sigs), NUM_PERM // BANDS
    group = np.full((n, BANDS), -1, np.int64)
    for band in range(BANDS):
        cols = sigs[:, band * rows:(band + 1) * rows]
        order = np.lexsort(cols.T[::-1])
        ordered = cols[order]
        starts = np.ones(n, bool)
        starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
        gid = np.cumsum(starts) - 1
        size = np.bincount(gid)
        shared = size[gid] > 1
        group[order[shared], band] = band * n + gid[shared]
    return group


def near_duplicates(texts: list[str], threshold: float = 0.8) -> set[int]:
    """Indices of texts whose word-5-gram Jaccard with an earlier kept text is at least `threshold`.

    Memory is a signature per text (NUM_PERM words); shingle sets are made again for the few texts LSH pairs
    up, not held for every text (they took about 8 KB a rephrasing: 3 GB for 400k)."""
    if not texts:
        return set()
    a, b = _permutations(0)
    sigs = np.empty((len(texts), NUM_PERM), np.uint64)
    for i, t in enumerate(texts):
        sigs[i] = _minhash(shingles(t), a, b)
    group = _shared_bands(sigs)
    del sigs
    kept_in: dict[int, list[int]] = defaultdict(list)  # band group -> kept texts in it, in order
    shingles_of = functools.lru_cache(maxsize=4096)(lambda j: shingles(texts[j]))
    dropped: set[int] = set()
    for i in np.flatnonzero((group >= 0).any(axis=1)).tolist():
        bands = [g for g in group[i].tolist() if g >= 0]
        candidates = {j for g in bands for j in kept_in.get(g, ())}
        # Candidates from LSH are confirmed on the exact Jaccard, so banding never drops a distinct text.
        if candidates:
            mine = shingles_of(i)
            if any(len(mine & (theirs := shingles_of(j))) / len(mine | theirs) >= threshold
                   for j in sorted(candidates)):
                dropped.add(i)
                continue
        for g in bands:
            kept_in[g].append(i)
    return dropped


def synthetic_texts(store: HarvestStore, keys: set[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Every kept rephrasing that passed the fidelity check (of the requests in `keys`, when given), in a
    stable order (teacher, format, document); and how many such rephrasings `keys` leaves out."""
    out, other = [], 0
    for r in store.rows("synth", "ok", columns="key, task, item_id, teacher, text, passed"):
        if not r["passed"]:
            continue
        if keys is not None and r["key"] not in keys:
            other += 1
            continue
        out.append({"text": r["text"].strip(), "source": f"finephrase:{r['task']}", "doc_id": r["item_id"],
                    "teacher": r["teacher"]})
    return out, other


def configured_keys(cfg: HarvestConfig, docs: list[tuple[str, str]]) -> set[str]:
    """The request keys `felix synth` asks under `cfg`: every teacher, document and format."""
    return {synth_job(did, text, fmt, t).key for t in cfg.teachers for did, text in docs for fmt in cfg.synth.formats}


def unanswered(store: HarvestStore, keys: set[str]) -> int:
    """Requests among `keys` that `felix synth` still owes: never asked, or failed and to be asked again."""
    return sum(1 for key in keys if (row := store.row(key)) is None or row["status"] in ("pending", "failed"))


def _none_kept(store: HarvestStore, keys: set[str], other: int) -> str:
    """Why none of this config's requests has a rephrasing to mix: its requests counted by what came of
    them, and what to do next."""
    n = dict.fromkeys(("malformed", "failed (no answer)", "kept out by the fidelity check", "not asked yet"), 0)
    for key in keys:
        row = store.row(key)
        if row is None or row["status"] == "pending":
            n["not asked yet"] += 1
        elif row["status"] == "ok":  # answered well-formed, but stating numbers its document does not
            n["kept out by the fidelity check"] += 1
        else:  # failed or gave_up: its last answer was malformed, or no answer came
            n["malformed" if store.last_outcome(key) == "malformed" else "failed (no answer)"] += 1
    counts = ", ".join(f"{v} {k}" for k, v in n.items() if v)
    others = f" ({other} kept of other documents, formats or teachers)" if other else ""
    if n["not asked yet"]:
        todo = "run `felix synth` with this config first"
    elif n["malformed"] or n["failed (no answer)"]:
        todo = ("`felix synth` asks the malformed and failed ones again while attempts are left (--retry-failed: "
                "those it gave up on)")
    else:
        todo = ("every answer failed the fidelity check (it states numbers its document does not, or a math "
                "problem uses none of the document's); try other teachers or formats")
    return f"0 of this config's {len(keys)} rephrasings kept: {counts}{others}; {todo}"


def write_mix(cfg: HarvestConfig, out: Path, synthetic_share: float | None = None,
              dedupe_threshold: float = 0.8) -> dict[str, Any]:
    """Blend deduplicated rephrasings with whole original documents into `out` (JSONL of {"text", "source",
    "doc_id"}), at `synthetic_share` of the characters; returns counts and the share reached.

    The originals are the usable source documents in sample order (the rephrased ones first), whole, so
    usually more than the rephrased ones; one that would overshoot the share by more than it fills is passed
    over for shorter ones after it (a 60k-character document among 20k of rephrasings would take a 0.5 share
    to 0.2), and the shortest passed over is added when the rest fall short. Only when the sources run out is
    the synthetic side thinned, and `rephrasings_left_out` counts what that left out. Documents a val split of
    synth.heldout holds are in neither side."""
    share = cfg.synth.synthetic_share if synthetic_share is None else synthetic_share
    if not 0 < share <= 1:
        raise FelixError(f"synthetic share must be in (0, 1], got {share}")
    if out.is_dir():
        raise FelixError(f"{out}: is a directory; give the .jsonl file to write")
    if any(out.resolve() == p.resolve() for p in [cfg.store_path, *cfg.synth_source_files()]):
        raise FelixError(f"{out}: is the store or a synth source; writing the mix there would destroy it")
    if not cfg.store_path.is_file():
        raise FelixError(f"{cfg.store_path}: no store yet; run `felix synth --config ...` first")
    corpus = select_documents(cfg)
    # Only what this config asks for: rows of other documents, formats, prompt versions or teacher settings
    # (an earlier run's) would add a second rephrasing of a document, or a format no longer wanted.
    keys = configured_keys(cfg, corpus.documents)
    with HarvestStore(cfg.store_path) as store:
        synth, other = synthetic_texts(store, keys)
        if not synth:
            raise FelixError(f"{cfg.store_path}: nothing to mix: {_none_kept(store, keys, other)}")
        owed = unanswered(store, keys)
    dropped = near_duplicates([s["text"] for s in synth], dedupe_threshold)
    synth = [s for i, s in enumerate(synth) if i not in dropped]
    rng = random.Random(cfg.synth.seed)
    s_chars = sum(len(s["text"]) for s in synth)
    want_orig = s_chars * (1 - share) / share
    chosen: list[tuple[str, str]] = []
    passed_over: list[tuple[str, str]] = []
    o_chars = 0
    for did, text in corpus.originals:
        if o_chars >= want_orig:
            break
        if len(text) > 2 * (want_orig - o_chars):  # overshoots more than it fills: shorter ones later may fit
            passed_over.append((did, text))
            continue
        chosen.append((did, text))
        o_chars += len(text)
    if o_chars < want_orig and passed_over:  # still short: the shortest one passed over overshoots least
        chosen.append(min(passed_over, key=lambda o: len(o[1])))
        o_chars += len(chosen[-1][1])
    picked = [{"text": text, "source": "original", "doc_id": did} for did, text in chosen]
    rephrasings = len(synth)
    if o_chars < want_orig and share < 1:  # too little original text: thin the synthetic side instead
        rng.shuffle(synth)
        keep, s_chars = [], 0
        for s in synth:
            if s_chars >= o_chars * share / (1 - share):
                break
            keep.append(s)
            s_chars += len(s["text"])
        synth = keep
    records = [{k: r[k] for k in ("text", "source", "doc_id")} for r in synth + picked]
    rng.shuffle(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:  # line by line: the whole mix as one string doubled its memory
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    by_source: dict[str, int] = defaultdict(int)
    for r in records:
        by_source[r["source"]] += 1
    total = s_chars + o_chars
    return {"out": str(out), "documents": len(records), "near_duplicates_dropped": len(dropped),
            "rephrasings_left_out": rephrasings - len(synth), "not_in_config": other,
            "requests": len(keys), "unanswered": owed, "heldout": heldout_report(corpus),
            "synthetic_chars": s_chars, "original_chars": o_chars,
            "synthetic_share": round(s_chars / total, 4) if total else 0.0,
            "by_source": dict(sorted(by_source.items()))}


def _mix_documents(mix: Path) -> Iterator[tuple[str, str]]:
    """(text, doc id) of each record of a written mix, streamed; a record lacking either names its line."""
    for line, r in json_records(mix):
        for field in ("text", "doc_id"):
            if not isinstance(r.get(field), str):
                problem = "missing" if field not in r else f"must be a string, got {type(r[field]).__name__}"
                raise FelixError(f"{mix}:{line}: {field!r} {problem} (`felix synth mix` writes \"text\", "
                                 f"\"source\" and \"doc_id\" on every line)")
        yield r["text"], r["doc_id"]


def shard_mix(mix: Path, tokenizer: FelixTokenizer, shard_dir: Path, val_fraction: float = 0.005,
              min_val_tokens: int = 0, seed: int = 0, config: Path | None = None) -> ShardSet:
    """Shard a written mix with each original and its rephrasings on one side of the train/val split (a
    rephrasing trained on would leak its original's val text, and the other way round: write_shards splits by
    doc id), the directory marked, in the same swap, as a synth mix's (see felix.synth_heldout)."""
    return write_shards(_mix_documents(mix), tokenizer, shard_dir, val_fraction=val_fraction, seed=seed,
                        min_val_tokens=min_val_tokens, sidecars=synth_mix_marker(mix, config))
