"""The byte-level BPE tokenizer: lossless round trip, special tokens, clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.errors import FelixError
from felix.tokenizer import SPECIAL_TOKENS, FelixTokenizer, train_tokenizer


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_round_trip_is_lossless_on_any_unicode(tiny_mix, text):
    tok = tiny_mix.tokenizer
    assert tok.decode(tok.encode(text)) == text


@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TOKENS)), max_size=8))
@settings(max_examples=100, deadline=None)
def test_special_token_strings_in_text_stay_text(tiny_mix, parts):
    tok = tiny_mix.tokenizer
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids.values())


def test_special_tokens_have_fixed_ids_and_templates_can_use_them(tiny_mix):
    tok = tiny_mix.tokenizer
    assert tok.eot_id == 0 and tok.token_id("<|pad|>") == tok.pad_id == 1
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode("<|user|>hi<|end|><|endoftext|>", allow_special=True)
    assert ids[0] == tok.token_id("<|user|>") and ids[-2:] == [tok.token_id("<|end|>"), 0]
    assert tok.decode(ids) == "<|user|>hi<|end|><|endoftext|>"


def test_token_byte_lengths_count_decoded_bytes(tiny_mix):
    tok = tiny_mix.tokenizer
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size and lengths[tok.eot_id] == 0
    text = "def héllo(x):\n    return x * 2  # ✓"
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_vocab_too_small_and_bad_files_are_clear_errors(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world " * 50)
    with pytest.raises(FelixError, match="too small"):
        train_tokenizer([src], 100, tmp_path / "t.json")
    with pytest.raises(FelixError, match="tokenizer not found"):
        FelixTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FelixError, match="bad.json: not a valid tokenizer"):
        FelixTokenizer.load(tmp_path / "bad.json")
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe broken")
    with pytest.raises(FelixError, match=r"bin.txt: line 2: not valid UTF-8"):
        train_tokenizer([tmp_path / "bin.txt"], 400, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_batch_encoding_matches_single_and_keeps_special_strings_as_text(tiny_mix):
    tok = tiny_mix.tokenizer
    texts = ["def f(x):\n    return x", "a <|endoftext|> b <|task:encoding|>", "", "ünïcödé 🙂"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert not set(batch[1]) & set(tok.special_ids.values())
    assert tok.encode("<|endoftext|>", allow_special=True) == [0]


def test_task_tokens_name_the_briefs_four_tasks():
    assert SPECIAL_TOKENS[0] == "<|endoftext|>" and len(SPECIAL_TOKENS) == len(set(SPECIAL_TOKENS)) == 10
    assert [t for t in SPECIAL_TOKENS if t.startswith("<|task:")] == [
        "<|task:encoding|>", "<|task:retrieval_synthesis|>", "<|task:principle_abstraction|>",
        "<|task:episode_summarization|>"]


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["plain text " * 20], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    hf.save(str(tmp_path / "plain.json"))
    with pytest.raises(FelixError, match=r"plain.json: tokenizer lacks the special tokens \['<\|endoftext\|>'"):
        FelixTokenizer.load(tmp_path / "plain.json")


@pytest.mark.parametrize("change", ["whitespace pre-tokenizer", "prefix space", "nfc normalizer", "no decoder"])
def test_a_tokenizer_that_is_not_lossless_byte_level_bpe_is_refused(tmp_path, change):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = (pre_tokenizers.Whitespace() if change == "whitespace pre-tokenizer"
                        else pre_tokenizers.ByteLevel(add_prefix_space=change == "prefix space"))
    if change != "no decoder":
        hf.decoder = decoders.ByteLevel()
    if change == "nfc normalizer":  # "é" as e + combining accent would come back as one character
        hf.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["plain text " * 20], trainer)
    hf.save(str(tmp_path / "other.json"))
    with pytest.raises(FelixError, match=r"other.json: not a byte-level BPE tokenizer .*felix tokenizer train"):
        FelixTokenizer.load(tmp_path / "other.json")


def test_sha256_is_of_the_file_and_training_is_deterministic(tmp_path):
    import hashlib

    src = tmp_path / "a.jsonl"
    src.write_text("".join(f'{{"text": "line {i} of some text, with words and more words"}}\n' for i in range(50)))
    a = train_tokenizer([src], 300, tmp_path / "a.json")
    b = train_tokenizer([src], 300, tmp_path / "b.json")
    assert a.sha256 == hashlib.sha256((tmp_path / "a.json").read_bytes()).hexdigest() == b.sha256
    assert a.vocab_size <= 300 and a.path == tmp_path / "a.json" and a.hf.get_vocab_size() == a.vocab_size


def test_no_trained_token_is_longer_than_llama_cpps_32_byte_buffer(tmp_path):
    """Before: indentation runs became tokens of a newline + 32-40 spaces, which llama-cpp-python detokenizes
    as b'' (its per-token buffer is 32 bytes), silently dropping generated code's indentation."""
    from felix.tokenizer import MAX_TOKEN_BYTES

    src = tmp_path / "code.jsonl"
    code = "".join(f"\n{' ' * (4 * depth)}x = {depth}  # {'é' * 30}" for depth in range(12))
    src.write_text("".join(json.dumps({"text": code}) + "\n" for _ in range(200)), encoding="utf-8")
    tok = train_tokenizer([src], 300, tmp_path / "t.json")
    lengths = [len(tok.token_bytes(i)) for i in range(tok.vocab_size) if i not in tok.special_ids.values()]
    assert MAX_TOKEN_BYTES == 32 and max(lengths) <= MAX_TOKEN_BYTES
    assert max(lengths) >= 24  # the cap, not too little text, is what stops the indentation runs
    assert tok.decode(tok.encode(code)) == code
    assert all(len(tok.token_bytes(i)) <= 32 for i in tok.encode(code))
