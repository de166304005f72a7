"""`felix data`: build a corpus, shard sources, verify shards and audit a mix's actual ratios."""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag, int_at_least
from felix.errors import FelixError


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("data", help=help,
                       description="Build a corpus, tokenize sources into shards, verify them, audit a mix.")
    verbs = p.add_subparsers(dest="data_command", metavar="<command>", required=True)

    c = verbs.add_parser("corpus", help="build the stdlib corpus (JSONL sources)",
                         description="Write code.jsonl and docs.jsonl from the Python standard library (and "
                                     "tasks.jsonl from the shipped task-suite samples) into --out.")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--max-bytes", type=int, help="cap on the corpus size in bytes")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the order files are taken in, so of which fit --max-bytes (default 0)")
    c.add_argument("--facts", action="store_true",
                   help="also facts.jsonl: statements of the standard library's fact tables (felix.facts), "
                        "outside --max-bytes")
    add_json_flag(c)
    c.set_defaults(func=run_corpus)

    s = verbs.add_parser("shard", help="tokenize documents into checksummed shards",
                         description="Tokenize .jsonl/.ndjson ({\"text\": ...} per line, or a chat's "
                                     "{\"messages\": [...]} as `felix harvest export` writes, rendered in the chat "
                                     "template `felix serve` uses) or .txt sources into train/val shards with an "
                                     "index.json (sizes, sha256).")
    s.add_argument("--input", nargs="+", required=True, help="source files (.jsonl, .ndjson or .txt)")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json")
    s.add_argument("--out", required=True, help="shard directory to write")
    s.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents held out for validation (default 0.005), chosen by a seeded hash of "
                        "each document's text, so a document stays held out when others are added or reordered; "
                        "from two documents up, at least one is held out, even at 0")
    s.add_argument("--min-val-tokens", type=int_at_least(0), default=0,
                   help="top a smaller validation split up to this many tokens with the train documents of "
                        "lowest hash (at most a quarter of the documents): a small source still gets enough "
                        "held-out text to measure")
    s.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    add_json_flag(s)
    s.set_defaults(func=run_shard)

    v = verbs.add_parser("verify", help="check shard sizes and checksums",
                         description="Verify shard directories (or every source of --mix) against their index.")
    v.add_argument("dirs", nargs="*", help="shard directories")
    v.add_argument("--mix", help="a data mix YAML: verify all its sources, and that one tokenizer made them all")
    v.add_argument("--tokenizer", help="with --mix: the tokenizer.json they must have been made with (as "
                                       "data.tokenizer of a training config)")
    add_json_flag(v)
    v.set_defaults(func=run_verify)

    a = verbs.add_parser("audit", help="actual vs target token ratios per source",
                         description="Per source: target share, actual share of tokens drawn, tokens available "
                                     "and epochs. 'Actual' comes from a run's latest checkpoint (--run) or from "
                                     "simulating the loader for --tokens tokens. For a run reweighted mid-way "
                                     "(--resume with a mix of other weights) it counts the samples since the "
                                     "reweight, which the loader aims at the current weights, and 'run' all.")
    a.add_argument("--mix", required=True, help="data mix YAML")
    origin = a.add_mutually_exclusive_group()
    origin.add_argument("--run", help="run directory: read the loader position of its latest checkpoint")
    origin.add_argument("--tokens", type=int, help="tokens to simulate (default 1,000,000) when --run is not given")
    a.add_argument("--seq-len", type=int, default=2048,
                   help="window length for --tokens (default 2048; a run's state has its own)")
    add_json_flag(a)
    a.set_defaults(func=run_audit)


def run_corpus(args: argparse.Namespace) -> int:
    from felix.corpus import build_stdlib_corpus

    sources = build_stdlib_corpus(Path(args.out), max_bytes=args.max_bytes, seed=args.seed, facts=args.facts)
    sizes = {n: p.stat().st_size for n, p in sources.items()}
    if args.json:
        print_json({"sources": {n: str(p) for n, p in sources.items()}, "bytes": sizes})
    else:
        for n, p in sources.items():
            print(f"{n:8s} {sizes[n] / 1e6:8.2f} MB  {p}")
    return 0


def run_shard(args: argparse.Namespace) -> int:
    from felix.corpus import check_source, iter_documents
    from felix.shards import write_shards
    from felix.tokenizer import FelixTokenizer

    if not 0.0 <= args.val_fraction < 1.0:
        raise FelixError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    out = Path(args.out).resolve()
    for flag, path in [*(("--input", p) for p in args.input), ("--tokenizer", args.tokenizer)]:
        if out in Path(path).resolve().parents:
            raise FelixError(f"{flag} {path} lies inside --out {args.out}, which a shard run replaces whole; "
                             f"move it out or shard elsewhere")
    for path in args.input:  # each one now, not after the minutes of tokenizing the ones before it
        check_source(path)
    tok = FelixTokenizer.load(args.tokenizer)
    docs = (d for path in args.input for d in iter_documents(path))
    shards = write_shards(docs, tok, Path(args.out), val_fraction=args.val_fraction, seed=args.seed,
                          min_val_tokens=args.min_val_tokens)
    summary = {s: {"tokens": shards.n_tokens(s), "documents": shards.n_documents(s), "bytes": shards.n_bytes(s)}
               for s in ("train", "val")}
    total = sum(v["documents"] for v in summary.values())
    for s, v in summary.items():  # a training run would refuse this source only much later
        if not v["documents"]:
            use = "trains on" if s == "train" else "validates on"
            warnings.warn(f"{args.out}: the {s} split has no documents ({total} in all): a mix {use} nothing of "
                          f"this source", stacklevel=1)
    if args.json:
        print_json({"out": args.out, **summary})
    else:
        for s, v in summary.items():
            print(f"{s:5s} {v['tokens']:>12,} tokens  {v['documents']:>8,} documents  {v['bytes']:>12,} bytes")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from felix.datamix import DataMix
    from felix.shards import ShardSet
    from felix.tokenizer import FelixTokenizer

    if args.tokenizer and not args.mix:
        raise FelixError("--tokenizer checks the sources of --mix: give --mix too")
    tok = FelixTokenizer.load(args.tokenizer) if args.tokenizer else None
    dirs = [Path(d) for d in args.dirs]
    if args.mix:
        mix = DataMix.load(args.mix)  # refuses one shard directory under two names
        dirs += [s.shards for s in mix.sources]
    if not dirs:
        raise FelixError("give shard directories or --mix")
    ok = {}
    for d in dirs:  # raises on the first bad one, naming the file
        shards = ShardSet.open(d, verify=True)
        ok[str(d)] = {"train_tokens": shards.n_tokens("train"), "val_tokens": shards.n_tokens("val")}
    if args.mix:  # as `felix train` does, after each source is known sound
        mix.validate_against(tok)
    if args.json:
        print_json({"verified": ok})
    else:
        for d, n in ok.items():
            print(f"ok  {d}  ({n['train_tokens']:,} train, {n['val_tokens']:,} val tokens)")
    return 0


def audit_rows(mix, counts: dict[str, int], seq_len: int, base: dict[str, int] | None = None) -> list[dict]:
    """One row per source: target share; actual share of the samples drawn since `base` (the per-source counts
    where the current weights took effect, a mid-run reweight; default the start) and over the whole run
    (`actual_run`); tokens drawn and available, and epochs (passes over the source's train windows, as the loader
    counts them), both over the whole run."""
    shards = mix.open_shards(verify=False)
    base = base or {}
    since = {n: c - base.get(n, 0) for n, c in counts.items()}
    total, total_since = sum(counts.values()), sum(since.values())
    rows = []
    for name, target in mix.targets().items():
        available = shards[name].n_tokens("train")
        windows = (available - 1) // seq_len if available > seq_len else 0
        drawn = counts.get(name, 0) * seq_len
        rows.append({"source": name, "target": target,
                     "actual": since.get(name, 0) / total_since if total_since else None,
                     "actual_run": counts.get(name, 0) / total if total else None,
                     "tokens_drawn": drawn, "tokens_available": available,
                     "epochs": counts.get(name, 0) / windows if windows else None})
    return rows


def _loader_position(meta: Path, mix, mix_path: str) -> tuple[dict[str, int], int, dict[str, int]]:
    """A checkpoint's loader position from its trainer.json: (per-source counts, seq_len, per-source counts where
    the current weights took effect: zeros unless the run was reweighted). Errors name the file."""
    import json

    try:
        state = json.loads(meta.read_text(encoding="utf-8"))["trainer"]["train_loader"]
        counts, seq_len = state["counts"], state["seq_len"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FelixError(f"{meta}: no loader position (trainer.train_loader) in it ({exc})") from None
    if not (isinstance(counts, dict) and all(type(c) is int and c >= 0 for c in counts.values())
            and type(seq_len) is int and seq_len >= 1):
        raise FelixError(f"{meta}: trainer.train_loader needs integer per-source 'counts' and 'seq_len' >= 1")
    # shares divide by every sample the run drew: a source the mix lacks would count in the total
    # and the mix's shares would not add up to one
    names = sorted(s.name for s in mix.sources)
    if sorted(counts) != names:
        raise FelixError(f"{meta}: the run drew from sources {sorted(counts)}, but {mix_path} names "
                         f"{names}; audit the run with its own mix")
    base = state.get("base")  # absent in states written before the loader stored it: the start
    if base is None:
        return counts, seq_len, dict.fromkeys(counts, 0)
    b = base.get("counts") if isinstance(base, dict) else None
    if not (isinstance(b, dict) and sorted(b) == names and all(type(c) is int and 0 <= c <= counts[n]
                                                               for n, c in b.items())):
        raise FelixError(f"{meta}: trainer.train_loader.base must give each source's count at or before its "
                         f"current one: {base}")
    weights = state.get("weights")
    targets = mix.targets()
    if isinstance(weights, dict) and all(type(weights.get(n)) in (int, float) for n in targets) and any(
            not math.isclose(weights[n], t, rel_tol=1e-6) for n, t in targets.items()):
        warnings.warn(f"{mix_path}: its weights are not the ones the run has drawn under since its last reweight "
                      f"({ {n: round(w, 4) for n, w in weights.items()} }): 'actual' is measured against "
                      f"targets the run did not aim for", stacklevel=3)
    return counts, seq_len, b


def run_audit(args: argparse.Namespace) -> int:
    from felix.checkpoint import latest_checkpoint
    from felix.dataloader import MixLoader
    from felix.datamix import DataMix

    mix = DataMix.load(args.mix)
    if args.run:
        ckpt = latest_checkpoint(Path(args.run))
        if ckpt is None:
            raise FelixError(f"{args.run}: no checkpoint to read the loader position from")
        counts, seq_len, base = _loader_position(ckpt / "trainer.json", mix, args.mix)
        origin = f"checkpoint {ckpt}"
    else:
        tokens = 1_000_000 if args.tokens is None else args.tokens
        if tokens < 1 or args.seq_len < 1:
            raise FelixError("--tokens and --seq-len must be positive")
        # the source choice depends on the weights alone, so any seed gives the same counts
        loader = MixLoader(mix, "train", args.seq_len, 1, 0, verify=False)
        loader.advance(max(1, tokens // args.seq_len))
        counts, seq_len, origin = loader.state_dict()["counts"], args.seq_len, f"simulated {tokens:,} tokens"
        base = dict.fromkeys(counts, 0)
    rows = audit_rows(mix, counts, seq_len, base)
    samples, since = sum(counts.values()), sum(base.values())
    # a mid-run reweight: the loader has aimed at the current targets from sample `since` on, not from the start
    measured = (f"actual: share of the {samples - since:,} samples since sample {since:,}, where these weights "
                f"took effect; run: share of all {samples:,}" if since else f"actual: share of all {samples:,} samples")
    if args.json:
        print_json({"origin": origin, "samples": samples, "since_sample": since, "measured": measured,
                    "sources": rows})
    else:
        print(f"data mix {args.mix} ({origin})")
        print(measured)
        run_col = f" {'run':>8s}" if since else ""
        print(f"{'source':12s} {'target':>8s} {'actual':>8s}{run_col} {'drawn':>14s} {'available':>14s} "
              f"{'epochs':>8s}")
        for r in rows:
            epochs = "-" if r["epochs"] is None else f"{r['epochs']:.3f}"
            run_share = f" {_pct(r['actual_run'])}" if since else ""
            print(f"{r['source']:12s} {r['target']:8.2%} {_pct(r['actual'])}{run_share} {r['tokens_drawn']:14,} "
                  f"{r['tokens_available']:14,} {epochs:>8s}")
    return 0


def _pct(share: float | None) -> str:
    return f"{'-':>8s}" if share is None else f"{share:8.2%}"
