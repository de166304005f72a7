"""Inputs for measuring the data pipeline at scale (docs/benchmarks.md, "The data pipeline at scale").

    python scripts/data_scale.py corpus MEGABYTES OUT [--seed 1] [--stdlib /usr/lib/python3.11]
    python scripts/data_scale.py sparse-shards OUT N_FILES N_TOKENS
    (e.g. `corpus 200 c200.jsonl`, `sparse-shards sh1800 1800 16777216`)

`corpus`: about MEGABYTES megabytes of {"text": ...} lines written to OUT, the standard library's .py files over
and over; each pass after the first renames half its identifiers with fresh made-up suffixes, so the distinct words
keep growing with the size (as in real text) instead of stopping at the library's own, and BPE training and encoding
see new words.
`sparse-shards`: a shard directory of N_FILES train files (and one val) of N_TOKENS uint16 zeros each, written
as sparse files: a 30B-token index, memmaps and checksums that take no disk space (reads return zeros).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ne", "tor", "vex", "qua", "zi", "ber", "dun", "fel", "gri", "hop", "jas", "wen",
             "yul", "ost", "pra", "sne", "tri"]
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")


def _rename(names: dict[str, str], rng: random.Random, m: re.Match) -> str:
    word = m.group(0)
    if word not in names:
        r = rng.random()
        names[word] = word if r < 0.5 else word + "".join(rng.choice(SYLLABLES) for _ in range(1 + int(r * 3)))
    return names[word]


def corpus(megabytes: float, out: Path, seed: int, stdlib: Path) -> None:
    rng = random.Random(seed)
    texts = []
    for path in sorted(stdlib.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
    target, written, passes = int(megabytes * 1e6), 0, 0
    with open(out, "w", encoding="utf-8") as f:
        while written < target:
            rename = functools.partial(_rename, {}, rng)  # this pass's renaming
            order = list(range(len(texts)))
            rng.shuffle(order)
            for i in order:
                text = IDENTIFIER.sub(rename, texts[i]) if passes else texts[i]
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
            passes += 1
    print(f"{out}: {written / 1e6:.1f} MB in {passes} passes")


def sparse_shards(out: Path, n_files: int, n_tokens: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    zeros = hashlib.sha256(bytes(2 * n_tokens)).hexdigest()
    splits = {}
    for split, n in (("train", n_files), ("val", 1)):
        files = []
        for i in range(n):
            name = f"{split}-{i:05d}.bin"
            with open(out / name, "wb") as f:
                f.truncate(2 * n_tokens)
            files.append({"file": name, "n_tokens": n_tokens, "sha256": zeros})
        splits[split] = {"files": files, "n_tokens": n * n_tokens, "n_documents": n, "n_bytes": 4 * n * n_tokens}
    meta = {"format_version": 1, "dtype": "uint16", "tokenizer_sha256": "0" * 64, "vocab_size": 32768,
            "eot_id": 0, "splits": splits}
    (out / "index.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    print(f"{out}: {n_files} x {n_tokens:,} tokens ({2 * n_files * n_tokens / 1e9:.1f} GB apparent, sparse)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("megabytes", type=float)
    c.add_argument("out", type=Path)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="where the .py files come from (default: this Python's standard library)")
    s = sub.add_parser("sparse-shards")
    s.add_argument("out", type=Path)
    s.add_argument("n_files", type=int)
    s.add_argument("n_tokens", type=int)
    args = p.parse_args()
    if args.what == "corpus":
        corpus(args.megabytes, args.out, args.seed, args.stdlib)
    else:
        sparse_shards(args.out, args.n_files, args.n_tokens)


if __name__ == "__main__":
    main()
