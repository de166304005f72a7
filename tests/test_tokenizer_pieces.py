"""Long documents are tokenized in pieces cut where the pre-tokenizer cuts anyway: the ids are exactly those
of the whole document, and the tokenizer (~200 bytes per token while it works) never holds a whole one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.corpus import stdlib_files
from felix.shards import PIECE_CHARS, write_shards
from felix.tokenizer import FelixTokenizer

# runs of spaces and newlines, tabs, CR, contractions, digits, punctuation, accents (composed and combining),
# CJK, emoji, and whitespace that is not ASCII (NBSP, U+2028, ideographic space, U+001F, U+0085)
ATOMS = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", "\r\n", "'s", "'ll", "x", "def", "f(x)", "_", "42", "3.14",
         "-", "!!", "...", "é", "e\u0301", "ß", "Straße", "日本語", "😀", "\u00a0", "\u2028", "\u3000", "\x1f", "\x85",
         "<|endoftext|>", "\\", "`", "~"]


def _stdlib_text(n_chars: int) -> str:
    text = ""
    for path in stdlib_files(seed=4):
        try:
            text += path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) >= n_chars:
            return text[:n_chars]
    return text


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(ATOMS) | st.text(max_size=6), max_size=80), size=st.integers(1, 40))
def test_pieces_encode_to_the_ids_of_the_whole_text(tiny_mix, parts, size):
    tok = tiny_mix.tokenizer
    text = "".join(parts)
    pieces = list(tok.text_pieces(text, size))
    assert "".join(pieces) == text and all(pieces[:-1])
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)


def test_real_text_is_cut_often_and_encodes_the_same(tiny_mix):
    tok = tiny_mix.tokenizer
    text = _stdlib_text(200_000)
    one_line = text.replace("\n", " ")  # no newline at all: cut at spaces
    for t in (text, one_line):
        pieces = list(tok.text_pieces(t, 1000))
        assert len(pieces) > 150 and max(map(len, pieces)) < 2000
        assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(t)
    assert list(tok.text_pieces("日本語" * 1000, 10)) == ["日本語" * 1000]  # nowhere to cut: whole


class _Recording(FelixTokenizer):
    """The tiny tokenizer, noting the texts of each batch it is given."""

    def __init__(self, tok: FelixTokenizer):
        super().__init__(tok.hf, tok.path)
        self.batches: list[list[int]] = []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.batches.append([len(t) for t in texts])
        return super().encode_batch(texts)


def test_write_shards_tokenizes_a_long_document_in_bounded_batches(tiny_mix, tmp_path):
    """A 16 MB one-line document went to the tokenizer whole and peaked at 3.2 GB."""
    tok = _Recording(tiny_mix.tokenizer)
    long = _stdlib_text(6 * PIECE_CHARS).replace("\n", " ")
    docs = ["short one", long, "short two", long[: PIECE_CHARS + 10]]
    shards = write_shards(docs, tok, tmp_path / "s", val_fraction=0.0, batch_chars=2 * PIECE_CHARS)
    assert max(n for b in tok.batches for n in b) < 1.1 * PIECE_CHARS
    assert max(map(sum, tok.batches)) < 3.1 * PIECE_CHARS
    ids = np.concatenate(shards.tokens("train") + shards.tokens("val"))
    ends = np.flatnonzero(ids == tok.eot_id)
    written = sorted(tuple(d) for d in np.split(ids, ends + 1)[:-1])
    assert written == sorted(tuple(tok.encode(d) + [tok.eot_id]) for d in docs)  # each whole, as encoded whole
