"""`felix synth`: FinePhrase rephrasing of source documents, and the synthetic/original mix."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from felix.cli import print_json
from felix.commands.harvest import add_teacher_run_options, print_stopped_teachers, reported_run

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
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="mix --tokenizer: share of documents held out for validation (default 0.005), each "
                        "original with its rephrasings; from two documents up, at least one is held out")
    p.add_argument("--min-val-tokens", type=int, default=0,
                   help="mix --tokenizer: top a smaller validation split up to this many tokens (at most a "
                        "quarter of the documents), as `felix data shard --min-val-tokens` does")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from felix.errors import FelixError
    from felix.harvest_config import load_harvest_config
    from felix.harvest_store import HarvestStore

    cfg = load_harvest_config(args.config, args.overrides)
    if args.action == "run":
        from felix.synth import run_synth

        reported_run(lambda: run_synth(cfg, teachers=args.teacher, retry_failed=args.retry_failed,
                                       progress=not args.no_progress and not args.json), _report_run, args.json)
        return 0
    if args.action == "status":
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
            from felix.shards import check_shard_output
            from felix.tokenizer import FelixTokenizer

            tok = FelixTokenizer.load(args.tokenizer)
            shard_dir = Path(args.shards) if args.shards else out.with_suffix("")
            if shard_dir.resolve() == out.resolve():
                raise FelixError(f"shard directory {shard_dir} is the mix file --out itself; name another with "
                                 f"--shards (or give --out a .jsonl suffix, and the default drops it)")
            # write_shards refuses these too, but only after the mix file was (over)written
            if shard_dir.exists() and not shard_dir.is_dir():
                raise FelixError(f"{shard_dir}: exists and is not a directory; name another with --shards")
            if shard_dir.resolve() in out.resolve().parents:
                raise FelixError(f"--out {out} lies inside the shard directory {shard_dir}, which is replaced whole; "
                                 f"name another with --shards")
            try:
                check_shard_output(shard_dir)
            except FelixError as exc:
                raise FelixError(f"{exc}; name another with --shards") from None
            if not 0.0 <= args.val_fraction < 1.0:
                raise FelixError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
            if args.min_val_tokens < 0:
                raise FelixError(f"--min-val-tokens must be >= 0, got {args.min_val_tokens}")
        result = write_mix(cfg, out, args.share)
        if tok is not None and shard_dir is not None:
            from felix.synth_mix import shard_mix

            shards = shard_mix(out, tok, shard_dir, val_fraction=args.val_fraction,
                               min_val_tokens=args.min_val_tokens, seed=cfg.synth.seed, config=Path(args.config))
            # absolute: a data mix resolves a relative path against its own directory, not this one
            result["shards"] = str(shard_dir.resolve())
            result["tokens"] = shards.n_tokens("train")
            result["val_tokens"] = shards.n_tokens("val")
            result["mix_source"] = {"name": out.stem, "shards": result["shards"], "weight": 1.0}
        _report_mix(result, args.json)
        return 0
    if args.json:
        print_json(result)
    return 0


def _heldout_line(result: dict) -> str | None:
    """What synth.heldout held out; when it is not set, a note on stderr (also under --json) and None."""
    from felix.synth import NO_HELDOUT

    h = result["heldout"]
    if h is None:
        print(NO_HELDOUT, file=sys.stderr)
        return None
    skipped = (f"; skipped a synth mix's own shards: {', '.join(h['skipped_synth_mixes'])}"
               if h["skipped_synth_mixes"] else "")
    n = len(h["val_documents"])
    near = f", {h['near_copies']} of them near copies" if h["near_copies"] else ""
    return (f"left out {h['documents_held_out']} source documents that val splits hold "
            f"({sum(h['val_documents'].values())} val documents read in {n} shard "
            f"director{'y' if n == 1 else 'ies'}{near}{skipped})")


def _report_run(result: dict, as_json: bool) -> None:
    """`felix synth run`'s summary on stdout; `--json`: one object, also when a signal stopped it."""
    if as_json:
        print_json(result)
        return
    r = result["run"]
    stopped = f" (stopped by {result['interrupted']})" if result["interrupted"] else ""
    print(f"{result['documents']} documents x {len(result['formats'])} formats: asked {r['owed']} of "
          f"{result['requests']}{stopped}: {r['ok']} answers kept, {r['malformed']} rejected, {r['failed']} attempts "
          f"unanswered, ${r['cost_usd']:.4f}")
    print_stopped_teachers(r)
    if line := _heldout_line(result):
        print(line)


def _report_mix(result: dict, as_json: bool) -> None:
    """`felix synth mix`'s summary on stdout (`--json`: one object)."""
    line = _heldout_line(result)
    if as_json:
        print_json(result)
        return
    print(f"{result['documents']} documents ({result['synthetic_share']:.0%} synthetic by characters, "
          f"{result['near_duplicates_dropped']} near-duplicates dropped) -> {result['out']}")
    if result["rephrasings_left_out"]:
        print(f"left out {result['rephrasings_left_out']} rephrasings to keep the synthetic share: the sources "
              f"hold too little original text (raise --share, or add sources)")
    if result["unanswered"]:
        print(f"{result['unanswered']} of this config's {result['requests']} requests have no answer yet (not "
              f"asked, or failed and owed again) and are not in this mix: `felix synth` asks them")
    if result["not_in_config"]:
        print(f"left out {result['not_in_config']} kept rephrasings that this config does not ask for "
              f"(other documents, formats, teachers or teacher settings)")
    if line:
        print(line)
    if "mix_source" in result:
        s = result["mix_source"]
        print(f"shards: {s['shards']} ({result['tokens']:,} train, {result['val_tokens']:,} val tokens); in a "
              f"data mix: - {{name: {s['name']}, shards: {s['shards']}, weight: <share>}}")
