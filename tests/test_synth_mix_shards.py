"""`felix synth mix --tokenizer`'s shards (felix.synth_mix.shard_mix): the mix is read and tokenized once, in
write_shards' bounded batches; the synth-mix marker comes with the shards, never after them; a hand-edited line
without its text or doc id names itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from felix.errors import FelixError
from felix.shards import BATCH_CHARS, SYNTH_MIX_MARKER, ShardSet
from felix.synth_heldout import split_documents
from felix.synth_mix import shard_mix


def write_mix(path: Path, n: int = 30) -> list[dict]:
    """A mix as `felix synth mix` writes it: each original with two rephrasings, sharing its doc id."""
    records = [{"text": f"{kind} of document {i}: " + "words and more words " * (i % 5 + 1), "source": source,
                "doc_id": f"d{i}"} for i in range(n)
               for kind, source in (("original", "original"), ("faq", "finephrase:faq"), ("table", "finephrase:table"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def test_the_mix_is_tokenized_once_and_groups_stay_whole(tiny_mix, tmp_path, monkeypatch):
    tok = tiny_mix.tokenizer
    records = write_mix(tmp_path / "mix.jsonl")
    encoded: list[int] = []  # characters per encode_batch call
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: encoded.append(sum(map(len, texts))) or real(texts))
    shards = shard_mix(tmp_path / "mix.jsonl", tok, tmp_path / "shards", val_fraction=0.0, min_val_tokens=200)
    # once, not a whole-mix pass to count tokens before write_shards' own (its batches bound the memory)
    assert sum(encoded) == sum(len(r["text"]) for r in records) and max(encoded) <= BATCH_CHARS
    doc_of = {r["text"]: r["doc_id"] for r in records}
    sides = {s: [doc_of[t] for t in split_documents(shards, s, tok)] for s in ("train", "val")}
    assert not set(sides["train"]) & set(sides["val"]) and len(sides["val"]) % 3 == 0
    assert shards.n_tokens("val") >= 200 and len(sides["train"]) + len(sides["val"]) == len(records)


def test_the_marker_is_in_the_directory_the_moment_the_shards_are(tiny_mix, tmp_path, monkeypatch):
    """A crash right after the shard directory was swapped in (here: reading it back) used to leave shards
    without their synth-mix marker, whose val split synth.heldout then took for held-out source text."""
    write_mix(tmp_path / "mix.jsonl")

    def crash(cls, *args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(ShardSet, "open", classmethod(crash))
    with pytest.raises(RuntimeError, match="killed"):
        shard_mix(tmp_path / "mix.jsonl", tiny_mix.tokenizer, tmp_path / "shards", config=tmp_path / "synth.yaml")
    assert (tmp_path / "shards" / "index.json").is_file()
    marker = json.loads((tmp_path / "shards" / SYNTH_MIX_MARKER).read_text(encoding="utf-8"))
    assert marker == {"mix": str((tmp_path / "mix.jsonl").resolve()),
                      "config": str((tmp_path / "synth.yaml").resolve())}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.pop("text"), "'text' missing"),
    (lambda r: r.pop("doc_id"), "'doc_id' missing"),
    (lambda r: r.update(doc_id=7), "'doc_id' must be a string, got int"),
])
def test_a_hand_edited_line_without_its_fields_names_file_line_and_field(tiny_mix, tmp_path, edit, message):
    mix = tmp_path / "mix.jsonl"
    records = write_mix(mix, n=3)
    edit(records[4])
    mix.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(FelixError, match=f"mix.jsonl:5: {message}"):
        shard_mix(mix, tiny_mix.tokenizer, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
