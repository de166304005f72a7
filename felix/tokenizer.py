"""Byte-level BPE (HF `tokenizers`) with the project's special tokens: lossless on any Unicode text."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from felix.atomic import atomic_path, check_output
from felix.chat import ChatDocument, chat_ids
from felix.corpus import check_source, surrogate_problem
from felix.errors import FelixError
from felix.tokenizer_text import TrainingText

EOT = "<|endoftext|>"
PAD = "<|pad|>"
TASKS = ("encoding", "retrieval_synthesis", "principle_abstraction", "episode_summarization")
# Ids are assigned in this order, so <|endoftext|> is always 0.
SPECIAL_TOKENS = [EOT, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  *(f"<|task:{t}|>" for t in TASKS)]
# Where a sample ends: the document, the turn, or the model starting another turn itself.
STOP_TOKENS = (EOT, "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
# Where byte-level BPE's pre-tokenizer (GPT-2's pattern) always cuts: before a space or newline that follows a
# letter, digit or ASCII punctuation mark. No pre-token spans such a place and none looks past it (the only
# look-ahead, `\s+(?!\S)`, ends inside a run of whitespace), and merges stay inside pre-tokens, so the text
# on either side encodes apart to exactly the ids it has within the whole.
_PIECE_END = re.compile(r"(?<=[^\W_]|[!-/:-@\[-`{-~])[ \n]")
# The longest token BPE training may make, in bytes. llama-cpp-python (0.3.36) detokenizes each token into a
# 32-byte buffer and gets b"" for a longer one, so a token of a newline and 32+ spaces would silently drop
# generated code's indentation. The trainer counts characters of the byte-level alphabet, one per byte; it
# keeps tokens shorter than its limit (tokenizers 0.23: 31 bytes at most), within the 32 either way.
MAX_TOKEN_BYTES = 32


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte is one printable character, itself where it is printable
    (`!`..`~`, `¡`..`¬`, `®`..`ÿ`), else the next code point from U+0100 up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, spare = {}, 0x100
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(spare)], spare = b, spare + 1
    return out


BYTE_OF_CHAR = _byte_of_char()


def train_tokenizer(files: Sequence[Path] | TrainingText, vocab_size: int, out_path: Path,
                    min_frequency: int = 2) -> FelixTokenizer:
    """Train byte-level BPE on the documents of `files` and save `tokenizer.json` atomically. `files` may be a
    `TrainingText`: a sample of them (`sample_bytes`), whose `sources` then count what training took."""
    text = files if isinstance(files, TrainingText) else None
    files = text.files if text is not None else [Path(p) for p in files]
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise FelixError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    if min_frequency < 0:
        raise FelixError(f"min_frequency must be >= 0, got {min_frequency}")
    # checked before training, which can take hours: afterwards a bad path would throw the work away
    if not files:
        raise FelixError("no input files to train the tokenizer on")
    for path in files:
        check_source(path)  # a missing file, a symlink loop, an unknown suffix
    if out_path.is_dir():
        raise FelixError(f"{out_path}: is a directory; give the tokenizer.json file to write")
    check_output(out_path, directory=False)  # a file on its path, no permission: named now, not after training
    if any(path.resolve() == out_path.resolve() for path in files):  # resolvable now: checked just above
        raise FelixError(f"{out_path}: the output is also an input; writing it would destroy that input")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        max_token_length=MAX_TOKEN_BYTES,
    )
    tok.train_from_iterator(text if text is not None else TrainingText(files), trainer)
    try:  # checked above; what changed since (a full disk, a directory removed) is still named
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_path) as tmp:
            tok.save(str(tmp))
    except OSError as exc:
        raise FelixError(f"output {out_path}: cannot write the tokenizer ({exc})") from None
    trained = FelixTokenizer.load(out_path)
    if vocab_falls_short(trained.vocab_size, vocab_size):  # BPE stops when no pair is frequent enough to merge
        sampled = text is not None and text.keep < 1.0
        warnings.warn(f"{out_path}: the {'sample' if sampled else 'input'} yields only {trained.vocab_size:,} "
                      f"tokens, not the {vocab_size:,} asked for: too little text{' (sample more)' if sampled else ''}"
                      f" (or min_frequency {min_frequency} too high) for that "
                      f"vocabulary; a model sized for {vocab_size:,} would never train its other embedding rows",
                      stacklevel=2)
    return trained


def vocab_falls_short(have: int, want: int) -> bool:
    """Whether a vocabulary of `have` tokens is far below the `want` it is meant to fill: more than a tenth
    short, past the padding a model's vocab_size is commonly rounded up by."""
    return have < 0.9 * want


class FelixTokenizer:
    """A trained tokenizer. `encode` treats text as text: a literal `<|endoftext|>` in user data is
    spelled out in bytes, never turned into the control token, unless `allow_special=True`."""

    def __init__(self, hf: Tokenizer, path: Path):
        self.hf, self.path = hf, path
        pre, dec = hf.pre_tokenizer, hf.decoder
        byte_level = (isinstance(hf.model, models.BPE) and isinstance(dec, decoders.ByteLevel) and hf.normalizer is None
                      and isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space)
        if not byte_level:  # anything else loses text in round trips and miscounts bytes (bits per byte)
            raise FelixError(f"{path}: not a byte-level BPE tokenizer without normalizer or prefix space (model "
                             f"{type(hf.model).__name__}, pre-tokenizer {type(pre).__name__}, decoder "
                             f"{type(dec).__name__}, normalizer {type(hf.normalizer).__name__}); make one with "
                             f"`felix tokenizer train`")
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise FelixError(f"{path}: tokenizer lacks the special tokens {missing}")
        hf.encode_special_tokens = True
        # added tokens other than the (never matched) special ones are cut out before pre-tokenizing, and
        # could span a piece boundary; without the regex the pre-tokenizer does not cut at all
        self._splittable = pre.use_regex and all(t.special for t in hf.get_added_tokens_decoder().values())
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @classmethod
    def load(cls, path: str | Path) -> FelixTokenizer:
        """Read tokenizer.json; FelixError when it is missing, unreadable or lacks the special tokens."""
        path = Path(path)
        if not path.is_file():
            raise FelixError(f"tokenizer not found: {path}")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise FelixError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(hf, path)

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings become control tokens only with `allow_special`
        (trusted templates); otherwise they are encoded as the literal text they are."""
        if problem := surrogate_problem(text):
            raise FelixError(f"cannot encode text: {problem}")
        if not allow_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self.hf.encode(piece, add_special_tokens=False).ids)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (parallel in the Rust library); special strings stay text, except in
        a `ChatDocument`, encoded in the chat template (`felix.chat.chat_ids`) with its role markers as ids."""
        chats = {i: t for i, t in enumerate(texts) if isinstance(t, ChatDocument)}
        if chats:
            plain = iter(self.encode_batch([t for i, t in enumerate(texts) if i not in chats]))
            return [chat_ids(self, chats[i].turns, prompt=False) if i in chats else next(plain)
                    for i in range(len(texts))]
        # offsets are never read: without them the same ids cost ~30% less CPU (where tokenizers has it)
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        try:
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        except TypeError:  # diagnosed only on failure: the check costs a copy of every text
            problems = [f"text {i}: {p}" for i, t in enumerate(texts) if (p := surrogate_problem(t))]
            if problems:
                raise FelixError(f"cannot encode text: {problems[0]}") from None
            raise

    def text_pieces(self, text: str, size: int) -> Iterator[str]:
        """`text` cut into pieces of `size` characters or a little more, only where the pre-tokenizer cuts
        anyway: encoding the pieces apart gives exactly the ids of encoding `text` whole, with the memory
        of one piece (the tokenizer holds ~200 bytes per token). Text without such places stays whole."""
        if isinstance(text, ChatDocument):  # its turns, not its spelled-out text, are what encode_batch reads
            yield text
            return
        start = 0
        while self._splittable and len(text) - start > size and (m := _PIECE_END.search(text, start + size)):
            yield text[start:m.start()]
            start = m.start()
        yield text[start:] if start else text

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are spelled out, so decode(encode(s)) == s for any string."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, tid: int) -> bytes:
        """The bytes token `tid` adds to decoded text: a special token's spelling, a piece's raw bytes
        (possibly part of a UTF-8 character)."""
        piece = self.hf.id_to_token(tid)
        if piece is None:
            raise FelixError(f"{self.path}: no token with id {tid}")
        if piece in self.special_ids:
            return piece.encode()
        return bytes(BYTE_OF_CHAR[c] for c in piece)

    # -- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> dict[str, int]:
        """Id of each SPECIAL_TOKENS entry."""
        return {t: self.hf.token_to_id(t) for t in SPECIAL_TOKENS}

    @property
    def eot_id(self) -> int:
        """`<|endoftext|>`: ends every document in the shards."""
        return self.special_ids[EOT]

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids of STOP_TOKENS: sampling ends at any of them (the CLI and the server alike)."""
        return tuple(self.special_ids[t] for t in STOP_TOKENS)

    @property
    def pad_id(self) -> int:
        """`<|pad|>`."""
        return self.special_ids[PAD]

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry (a special token or a byte-level BPE piece)."""
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise FelixError(f"{self.path}: {token!r} is not a single token of this vocabulary")
        return tid

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token contributes to decoded text (0 for special tokens), for bits per byte.

        Byte-level BPE maps each byte to one printable character, so a piece's length is its byte count.
        """
        out = np.zeros(self.vocab_size, dtype=np.int64)
        special = set(self.special_ids.values())
        for i in range(self.vocab_size):
            if i not in special:
                out[i] = len(self.hf.id_to_token(i))
        return out

    @cached_property
    def sha256(self) -> str:
        """sha256 of tokenizer.json: shards record it so a mix can refuse another tokenizer's data."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @cached_property
    def pieces(self) -> list[str | None]:
        """The token of each id, in id order (special tokens included)."""
        return [self.hf.id_to_token(i) for i in range(self.vocab_size)]

    @cached_property
    def merges(self) -> list[tuple[str, str]]:
        """BPE merges in rank order; tokenizers versions serialize them as "a b" or ["a", "b"]."""
        raw = json.loads(self.hf.to_str())["model"].get("merges") or []
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]

    @cached_property
    def vocab_digest(self) -> str:
        """sha256 of what makes token ids: the token of each id and the merges in order. Unlike `sha256`, the
        same for a tokenizer.json re-serialized (whitespace, key order, another tokenizers version's layout)."""
        doc = json.dumps({"pieces": self.pieces, "merges": self.merges}, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    def difference(self, other: FelixTokenizer) -> str:
        """How `other` makes other token ids than this one, in words (empty when it makes the same)."""
        if other.vocab_digest == self.vocab_digest:
            return ""
        mine, theirs = self.pieces, other.pieces
        moved = sum(a != b for a, b in zip(mine, theirs, strict=False)) + abs(len(mine) - len(theirs))
        if moved:
            return f"{moved} of {max(len(mine), len(theirs))} ids name other tokens"
        return f"the same {len(mine)} tokens, other merges (text splits into other ids)"
