"""`felix synth`: FinePhrase rephrasing of source documents, and the synthetic/original mix."""

from __future__ import annotations

import argparse
from pathlib import Path

from felix.cli import print_json
from felix.commands.harvest import add_teacher_run_options

ACTIONS = ("run", "status", "mix")


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "synth", help=help,
        description="run (default): rephrase every document of synth.sources into every synth.formats with the "
                    "configured teachers, through the harvest store (idempotent, resumable). status: counts and "
                    "cost. mix: deduplicate the rephrasings and blend them with the original documents at "
                    "synth.synthetic_share of the characters into a JSONL source; with --tokenizer, also shard "
                    "it so a data mix can name it.")
    add_teacher_run_options(p, ACTIONS, "harvest YAML with a synth section", "synth.max_documents=100")
    p.add_argument("--out", help="mix: output JSONL file")
    p.add_argument("--share", type=float, help="mix: synthetic share of characters (default: synth.synthetic_share)")
    p.add_argument("--tokenizer", help="mix: tokenizer.json; shard the mix into --shards")
    p.add_argument("--shards", help="mix: shard directory (default: beside --out, named after it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from felix.errors import FelixError
    from felix.harvest_config import load_harvest_config
    from felix.harvest_store import HarvestStore

    cfg = load_harvest_config(args.config, args.overrides)
    if args.action == "run":
        from felix.synth import run_synth

        result = run_synth(cfg, teachers=args.teacher, retry_failed=args.retry_failed,
                           progress=not args.no_progress and not args.json)
        if not args.json:
            r = result["run"]
            print(f"{result['documents']} documents x {len(result['formats'])} formats: asked {r['owed']} of "
                  f"{result['requests']}: {r['ok']} kept, {r['malformed']} malformed, {r['failed']} failed, "
                  f"${r['cost_usd']:.4f}")
    elif args.action == "status":
        if not cfg.store_path.is_file():
            raise FelixError(f"{cfg.store_path}: no store yet; run `felix synth --config {args.config}` first")
        with HarvestStore(cfg.store_path) as store:
            result = {"store": str(cfg.store_path), "totals": store.totals("synth")}
        if not args.json:
            for t, v in sorted(result["totals"].items()):
                print(f"{t}: {v['ok']} kept, {v['failed']} failed, {v['gave_up']} gave up, ${v['cost_usd']:.4f}")
    else:
        from felix.synth_mix import write_mix

        if not args.out:
            raise FelixError("mix needs --out FILE.jsonl")
        out = Path(args.out)
        tok, shard_dir = None, None
        if args.tokenizer:  # checked before the mix is written, so a bad one leaves nothing behind
            from felix.shards import INDEX
            from felix.tokenizer import FelixTokenizer

            tok = FelixTokenizer.load(args.tokenizer)
            shard_dir = Path(args.shards) if args.shards else out.with_suffix("")
            if shard_dir.resolve() == out.resolve():
                raise FelixError(f"shard directory {shard_dir} is the mix file --out itself; name another with "
                                 f"--shards (or give --out a .jsonl suffix, and the default drops it)")
            # write_shards refuses these too, but only after the mix file was (over)written
            if shard_dir.exists() and not shard_dir.is_dir():
                raise FelixError(f"{shard_dir}: exists and is not a directory; name another with --shards")
            if shard_dir.is_dir() and any(shard_dir.iterdir()) and not (shard_dir / INDEX).is_file():
                raise FelixError(f"{shard_dir}: exists and is not a shard directory; name another with --shards")
        result = write_mix(cfg, out, args.share)
        if tok is not None and shard_dir is not None:
            from felix.corpus import iter_documents
            from felix.shards import write_shards

            shards = write_shards(iter_documents(out), tok, shard_dir)
            # absolute: a data mix resolves a relative path against its own directory, not this one
            result["shards"] = str(shard_dir.resolve())
            result["tokens"] = shards.n_tokens("train")
            result["mix_source"] = {"name": out.stem, "shards": result["shards"], "weight": 1.0}
        if not args.json:
            print(f"{result['documents']} documents ({result['synthetic_share']:.0%} synthetic by characters, "
                  f"{result['near_duplicates_dropped']} near-duplicates dropped) -> {result['out']}")
            if result["not_in_config"]:
                print(f"left out {result['not_in_config']} kept rephrasings that this config does not ask for "
                      f"(other documents, formats, teachers or teacher settings)")
            if "mix_source" in result:
                s = result["mix_source"]
                print(f"shards: {s['shards']}; in a data mix: - {{name: {s['name']}, shards: {s['shards']}, "
                      f"weight: <share>}}")
    if args.json:
        print_json(result)
    return 0
