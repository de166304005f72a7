"""`felix tokenizer`: train the byte-level BPE tokenizer and inspect encodings."""

from __future__ import annotations

import argparse
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag, byte_size


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("tokenizer", help=help,
                       description="Byte-level BPE with the project's special tokens (document end, chat roles, "
                                   "the four task-suite tasks).")
    verbs = p.add_subparsers(dest="tokenizer_command", metavar="<command>", required=True)
    t = verbs.add_parser("train", help="train on source files", description="Train byte-level BPE on .jsonl/.ndjson/"
                         ".txt sources (as `felix data shard` reads them) and write tokenizer.json. Training holds "
                         "every distinct word of its text (~1.3 KB each): on a corpus of many GB give --sample-bytes, "
                         "e.g. 2G, to train on a sample of that much text drawn from every source.")
    t.add_argument("--input", nargs="+", required=True, help="source files (.jsonl, .ndjson or .txt)")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special tokens included")
    t.add_argument("--min-frequency", type=int, default=2,
                   help="fewest occurrences a pair needs to be merged (default 2)")
    t.add_argument("--sample-bytes", type=byte_size, metavar="N",
                   help="train on about N bytes of text (500M, 2G, 2GiB) instead of all of it: whole documents, "
                        "each kept by a seeded hash of its text with one probability for every source, so each is "
                        "represented in proportion to its size (and by one document at least). Every input is "
                        "still read once, streamed; BPE holds only the sample's words. Default: all the text")
    t.add_argument("--seed", type=int, default=0, help="seed of the --sample-bytes draw (default 0)")
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
    from felix.commands.info import human
    from felix.tokenizer import train_tokenizer
    from felix.tokenizer_text import TrainingText

    text = TrainingText([Path(p) for p in args.input], args.sample_bytes, args.seed)
    tok = train_tokenizer(text, args.vocab_size, Path(args.out), args.min_frequency)
    report = text.report
    if args.json:
        print_json({"path": str(tok.path), "vocab_size": tok.vocab_size, "sha256": tok.sha256, **report})
        return 0
    print(f"wrote {tok.path}: {tok.vocab_size:,} tokens")
    if args.sample_bytes is not None:
        print(f"trained on {report['documents']:,} documents, {human(report['bytes'], 'B')} of text, of "
              f"{human(args.sample_bytes, 'B')} asked (keep probability {text.keep:.3g}, seed {args.seed}):")
        for s in text.sources:
            print(f"  {s.path}: {s.documents:,} of {s.documents_read:,} documents, {human(s.bytes, 'B')} of "
                  f"{human(s.bytes_read, 'B')}")
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
