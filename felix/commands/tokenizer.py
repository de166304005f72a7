"""`felix tokenizer`: train the byte-level BPE tokenizer and inspect encodings."""

from __future__ import annotations

import argparse
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("tokenizer", help=help,
                       description="Byte-level BPE with the project's special tokens (document end, chat roles, "
                                   "the four task-suite tasks).")
    verbs = p.add_subparsers(dest="tokenizer_command", metavar="<command>", required=True)
    t = verbs.add_parser("train", help="train on source files", description="Train byte-level BPE on .jsonl/.ndjson/"
                         ".txt sources (as `felix data shard` reads them) and write tokenizer.json.")
    t.add_argument("--input", nargs="+", required=True, help="source files (.jsonl, .ndjson or .txt)")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special tokens included")
    t.add_argument("--min-frequency", type=int, default=2,
                   help="fewest occurrences a pair needs to be merged (default 2)")
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    add_json_flag(t)
    t.set_defaults(func=run_train)
    e = verbs.add_parser("encode", help="show the tokens of a text", description="Encode text and show its tokens.")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json")
    e.add_argument("--text", required=True, help="text to encode")
    e.add_argument("--allow-special", action="store_true", help="turn special-token strings into control tokens")
    add_json_flag(e)
    e.set_defaults(func=run_encode)


def run_train(args: argparse.Namespace) -> int:
    from felix.tokenizer import train_tokenizer

    tok = train_tokenizer([Path(p) for p in args.input], args.vocab_size, Path(args.out), args.min_frequency)
    if args.json:
        print_json({"path": str(tok.path), "vocab_size": tok.vocab_size, "sha256": tok.sha256})
    else:
        print(f"wrote {tok.path}: {tok.vocab_size:,} tokens")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from felix.tokenizer import FelixTokenizer

    tok = FelixTokenizer.load(args.tokenizer)
    ids = tok.encode(args.text, allow_special=args.allow_special)
    pieces = [tok.hf.id_to_token(i) for i in ids]
    if args.json:
        print_json({"ids": ids, "tokens": pieces, "n_tokens": len(ids), "n_bytes": len(args.text.encode())})
    else:
        print(f"{len(ids)} tokens: " + " ".join(f"{i}:{p!r}" for i, p in zip(ids, pieces, strict=True)))
    return 0
