"""The `felix splice` verbs that make edits: apply, bench and make-edits, with the edit options they share
(checked into an EditConfig) and the edit requests they read (also diagnose's). `felix.commands.splice` parses
the arguments and dispatches here."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

from felix.atomic import atomic_write_text, check_output
from felix.cli import print_json
from felix.errors import FelixError


def _config(args: argparse.Namespace):
    from felix.splice_config import EditConfig

    if args.neutral_tokens is not None and args.neutral_tokens < 1:
        raise FelixError(f"--neutral-tokens must be at least 1, got {args.neutral_tokens}")
    if args.context_keys is not None and args.context_keys < 0:
        raise FelixError(f"--context-keys must be 0 or more, got {args.context_keys}")
    if args.margin is not None and not args.margin > 0:
        raise FelixError(f"--margin must be positive, got {args.margin}")
    if args.text_pins is not None and args.text_pins < 0:
        raise FelixError(f"--text-pins must be 0 or more, got {args.text_pins}")
    if args.prompt_weight is not None and not args.prompt_weight > 0:
        raise FelixError(f"--prompt-weight must be positive, got {args.prompt_weight}")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise FelixError(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")
    if args.prompt_repair is not None and args.prompt_repair < 0:
        raise FelixError(f"--prompt-repair must be 0 or more, got {args.prompt_repair}")
    if args.repair_drop is not None and not (args.repair_drop > 0 and args.prompt_repair):
        raise FelixError(f"--repair-drop must be positive and go with --prompt-repair N > 0, got {args.repair_drop}")
    for flag in ("prompt_weight", "prompt_tokens", "prompt_repair"):
        if getattr(args, flag) is not None and not args.preserve_prompts:
            raise FelixError(f"--{flag.replace('_', '-')} applies to --preserve-prompts; give the prompts too")
    for flag in ("preserve_windows", "heldout_windows", "pin_windows"):
        if getattr(args, flag) <= 0:
            raise FelixError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return EditConfig().replace(method=args.method, layers=args.layers, steps=args.steps, lr=args.lr,
                                kl_weight=args.kl_weight, train=args.train, optimizer=args.optimizer,
                                delta_steps=args.delta_steps, delta_lr=args.delta_lr, margin=args.margin,
                                max_ppl_increase=args.max_ppl_increase,
                                max_neutral_kl=args.max_neutral_kl,
                                max_total_ppl_increase=args.max_total_ppl_increase,
                                protect_neutral=args.protect_neutral, protect_suite=args.protect_suite,
                                neutral_tokens=args.neutral_tokens, context_keys=args.context_keys,
                                text_pins=args.text_pins, prompt_weight=args.prompt_weight,
                                prompt_tokens=args.prompt_tokens, prompt_repair=args.prompt_repair,
                                prompt_repair_drop=args.repair_drop)


def _text_pins(args, cfg, ckpt, model, tok, withheld=()):
    """The pin search, when the edits use text pins."""
    from felix.splice_pins import TextPins, pin_windows

    return TextPins(pin_windows(ckpt, model, args.pin_windows), tok, withheld) if cfg.text_pins else None


def _preserve_prompts(args, tok, max_len: int, withheld=()) -> tuple[list[list[int]], int]:
    """--preserve-prompts as token ids (cut to the context, `prompt_ids`), without any that is one of `withheld`
    (a bench's evaluation prompts); and how many were left out for that."""
    from felix.splice_data import load_prompts
    from felix.splice_examples import prompt_ids

    if not args.preserve_prompts:
        return [], 0
    prompts = load_prompts(args.preserve_prompts)
    withheld = set(withheld)
    kept = [prompt_ids(tok, p, max_len) for p in prompts if p not in withheld]
    return kept, len(prompts) - len(kept)


def _edit_inputs(args, n_prompts: int) -> dict:
    """What an edit protected, for its patch record: the text windows and the preservation prompts used
    (file, sha256 of its bytes, how many)."""
    out = {"preserve_windows": args.preserve_windows, "heldout_windows": args.heldout_windows}
    if args.preserve_prompts:
        digest = hashlib.sha256(Path(args.preserve_prompts).read_bytes()).hexdigest()
        out["preserve_prompts"] = {"file": str(args.preserve_prompts), "sha256": digest, "used": n_prompts}
    return out


def edit_requests(args: argparse.Namespace):
    """The edit requests of diagnose (--prompt/--target) or apply (those, or --edits FILE, not both)."""
    from felix.splice_edit import EditRequest, load_requests

    verb = f"splice {args.splice_verb}"
    if edits := getattr(args, "edits", None):
        inline = [f for f, v in (("--prompt", args.prompt), ("--target", args.target),
                                 ("--paraphrase", args.paraphrase), ("--neutral", args.neutral)) if v not in (None, [])]
        if inline:  # they would be ignored: the file holds every request's own
            raise FelixError(f"{verb}: {', '.join(inline)} cannot be given with --edits {edits}, whose lines are the "
                             "edit requests; give --prompt and --target, or --edits")
        return load_requests(edits)
    if not (args.prompt and args.target):
        either = " (or --edits FILE)" if args.splice_verb == "apply" else ""
        empty = [f"{f} is empty" for f, v in (("--prompt", args.prompt), ("--target", args.target)) if v == ""]
        raise FelixError(f"{verb} needs --prompt and --target{either}" + "".join(f"; {e}" for e in empty))
    return [EditRequest(args.prompt, args.target, args.paraphrase, args.neutral)]


def apply_verb(args: argparse.Namespace, model, tok, ckpt, stack) -> int:
    """splice apply: propose each request's edit and push those within the budget onto the patch stack. A request
    whose edit the stack already made (`splice_edit.applied_as`) and that still holds is skipped, not made again."""
    from felix.heldout import heldout_nll
    from felix.prefix_memo import prefix_memo
    from felix.splice_config import EditContext
    from felix.splice_covariance import InputCovariances
    from felix.splice_data import (
        context_variants,
        examples_of,
        splice_texts,
        stack_edit_ids,
        stack_edits,
        stack_neutral,
    )
    from felix.splice_diagnose import diagnose
    from felix.splice_edit import applied_as, patch_record, propose_edit
    from felix.splice_examples import prompt_ids
    from felix.splice_fold import StackFold
    from felix.splice_quant import GPTQ_FORMATS, deployment_format

    cfg = _config(args)
    # every request checked before any work, and before any is applied: a bad line further down the file (a
    # target that fills the context) used to stop the run after the edits above it were committed, unreported
    requests = edit_requests(args)
    edits = [examples_of(tok, req, model.cfg.max_seq_len) for req in requests]
    heldout, preserve = splice_texts(ckpt, model, args.preserve_windows, args.heldout_windows)
    origin_nll = heldout_nll(model, heldout) if cfg.max_total_ppl_increase is not None else None
    stack.restore(model)
    # on a `felix quantize` artifact the stack keeps unrounded edits and is rounded once, as a whole, where
    # it is served (EXP-46z), on the text every loader folds with; each edit must hold in that rounding
    fold = StackFold.of_checkpoint(ckpt, model) if ckpt.quant_format in GPTQ_FORMATS else None
    deploy = deployment_format(ckpt)
    prompts = _preserve_prompts(args, tok, model.cfg.max_seq_len)[0]
    covariances = InputCovariances(preserve, prompts, cfg.prompt_weight, cfg.prompt_tokens)
    inputs = _edit_inputs(args, len(prompts))
    pins = _text_pins(args, cfg, ckpt, model, tok)
    max_len = model.cfg.max_seq_len
    results = []
    # each edit's budget reads the same held-out windows: after the first, only the blocks from the lowest
    # edited SpliceCore on run (felix.prefix_memo)
    with prefix_memo(model):
        for req, (ex, paras) in zip(requests, edits, strict=True):
            prior = stack_edits(stack, tok, max_len)
            record = patch_record(req, cfg, {}, inputs, fold.fmt if fold else None)
            # a re-run (a script run again, a run cut short) must not make an edit twice: closed_form_a wrote a
            # zero-change patch, kl_train trained on
            if (same := applied_as(stack.list(), record)) is not None and _holds(model, ex, fold, prior):
                results.append(_already_applied(req, cfg, same.id))
                if not args.json:
                    _print_row(results[-1], cfg)
                continue
            layers = cfg.layers or diagnose(model, tok, ex)["chosen_layers"]
            ctx = EditContext(preserve, [prompt_ids(tok, n, max_len) for n in req.neutral], prior, covariances,
                              suite=[prompt_ids(tok, n, max_len) for n in stack_neutral(stack)],
                              variants=context_variants(tok, req, preserve, cfg.context_keys, max_len),
                              pins=pins, pin_exclude=(req.prompt, *req.paraphrases), preserve_prompts=prompts,
                              prior_names=stack_edit_ids(stack))
            out = propose_edit(model, ex, layers, ctx, heldout, cfg, paras, origin_nll=origin_nll, fold=fold)
            # an artifact's fold checked this already; elsewhere the deployment rounds the write plainly
            warnings = _check_storable(out, model, deploy) if fold is None else []
            row = {"request": req.to_dict(), "status": "applied" if out.accepted else "rejected",
                   "accepted": out.accepted, "reason": out.reason, "metrics": out.metrics}
            if same is not None:  # the stack made this edit before, and something since undid it
                row["no_longer_holds"] = same.id
            if warnings:
                row["warnings"] = warnings
            if out.accepted:
                row["patch_id"] = stack.apply(model, out.after, record | {"metrics": out.metrics}).id
                if fold is not None:  # the fold just judged is the one every loader will serve: store it
                    fold.record(fold.digest(model, [*prior, ex]), out.served)
            results.append(row)
            if not args.json:
                _print_row(row, cfg)
    counts = {status: sum(r["status"] == status for r in results) for status in ("applied", "rejected")}
    if args.json:
        print_json({"results": results, **counts, "already_applied": len(results) - sum(counts.values())})
    return 1 if counts["rejected"] else 0


def _holds(model, ex, fold, prior) -> bool:
    """Whether `model` (holding the stack) makes `ex`'s target greedy as it is served (on an artifact: folded)."""
    from felix.splice_examples import greedy_hits

    served = fold.served(model, prior) if fold is not None else None
    if served is None:
        return greedy_hits(model, [ex])[0]
    own = model.splice_state()
    try:
        model.load_splice_state(served)
        return greedy_hits(model, [ex])[0]
    finally:
        model.load_splice_state(own)


def _already_applied(req, cfg, patch_id: str) -> dict:
    """The report of a request whose edit patch `patch_id` made and which still holds: nothing is written."""
    metrics = {"method": cfg.method, "success": True, "ppl_increase": 0.0, "neutral_kl": 0.0,
               "paraphrase_success": None, "already_applied": patch_id}
    return {"request": req.to_dict(), "status": "already_applied", "accepted": False, "patch_id": patch_id,
            "reason": f"already applied as {patch_id}, which still holds: nothing written", "metrics": metrics}


def _check_storable(out, model, deploy: tuple[str, str | None]) -> list[str]:
    """An accepted write the deployment format cannot store (`splice_quant.unstorable`): refused (`out` is marked
    so) where the checkpoint says it is meant for that format (`deployment_format`), else the warnings to report."""
    from felix.splice_quant import unstorable

    fmt, meant = deploy
    if not out.accepted or (why := unstorable(out.after, fmt, model.splice_state())) is None:
        return []
    if meant:
        out.accepted = False
        out.reason = f"{fmt} cannot store the edited SpliceCore ({why}), and {meant}"
        return []
    return [f"{fmt} cannot store the edited SpliceCore ({why}): while this patch is in the stack, `felix quantize "
            f"--format {fmt}` of this checkpoint and `felix serve --format {fmt}` of it fail; roll it back before "
            f"deploying in {fmt}"]


def _print_row(row: dict, cfg) -> None:
    """One request's line of `apply`'s text report (warnings on stderr)."""
    req, m = row["request"], row["metrics"]
    what = f"{req['prompt'][-40:]!r} -> {req['target']!r}"
    if row["status"] == "already_applied":
        print(f"already applied as {row['patch_id']}: {what} still holds; nothing written")
        return
    head = f"applied {row['patch_id']}" if row["accepted"] else "REJECTED"
    print(f"{head}: {what} [{cfg.method}, layers {m['layers']}] success={m['success']} "
          f"ppl {100 * m['ppl_increase']:+.3f}% KL "
          + ("n/a (no neutral prompts)" if m["neutral_kl"] is None else f"{m['neutral_kl']:.4f}")
          + ("" if row["accepted"] else f" ({row['reason']})")
          + (f" (re-applied: {row['no_longer_holds']} made this edit and no longer holds)"
             if "no_longer_holds" in row else ""))
    for w in row.get("warnings", ()):
        print(f"warning: {w}", file=sys.stderr)


def bench_verb(args: argparse.Namespace, model, tok, ckpt, stack) -> int:
    """splice bench: apply the first --n edits in sequence and report success, retention, locality, drift."""
    from felix.patches import PatchStack, lock_stack
    from felix.run_lock import lock_run_dir
    from felix.splice_bench import plot_bench, run_bench
    from felix.splice_bench_progress import PROGRESS_FILE
    from felix.splice_data import splice_texts
    from felix.splice_edit import load_requests
    from felix.splice_fold import StackFold
    from felix.splice_quant import GPTQ_FORMATS, gptq_requantizer, requantizer

    if args.n <= 0:
        raise FelixError("--n must be positive")
    if args.out:  # named now, not as a traceback once the bench is done
        check_output(args.out, "--out", directory=True)
    elif args.resume:
        raise FelixError("--resume needs --out, the directory of the bench to continue")
    progress = Path(args.out) / PROGRESS_FILE if args.out else None
    if progress is not None and not args.resume and progress.exists():
        raise FelixError(f"{args.out} holds an unfinished bench ({progress}): continue it with --resume, or remove "
                         "that file to start it again")
    requests = load_requests(args.edits)
    if len(requests) < args.n:
        raise FelixError(f"{args.edits} holds {len(requests)} edits, fewer than --n {args.n}")
    cfg = _config(args)

    started = time.perf_counter()
    first: tuple[int, float] | None = None  # the first step logged (a resumed bench starts past 1), and when

    def log(row):  # progress on stderr, with --json too: a 100-edit bench runs for tens of minutes
        nonlocal first
        now = time.perf_counter()
        if first is None:
            first = (row["step"], now)
        # timed from the first step's end: the first step also paid for the bench's setup (its references), which
        # took minutes at 53.4M and made the first ETAs several times too long
        since, t_first = row["step"] - first[0], first[1]
        eta = f"{(now - t_first) / since * (args.n - row['step']) / 60:.1f} min" if since else "after the next step"
        print(f"step {row['step']:>3}/{args.n} {'ok ' if row['success'] else 'BAD'} retention {row['retention']:.2f} "
              f"locality {row.get('locality', 1):.2f} ppl drift {100 * row['ppl_drift']:+.2f}%  "
              f"[{(now - started) / 60:.1f} min, ETA {eta}]"
              + ("" if row["accepted"] else f"  rejected: {row['reason']}"), file=sys.stderr, flush=True)

    heldout, preserve = splice_texts(ckpt, model, args.preserve_windows, args.heldout_windows)
    keep = Path(args.keep_patches) if args.keep_patches else None
    # the kept stack is written for the whole bench, so it is held as `apply` holds a checkpoint's (it may be one)
    held = lock_stack(keep, "felix splice bench --keep-patches") if keep is not None else contextlib.nullcontext()
    # one bench at a time writes an --out's progress
    own_out = lock_run_dir(Path(args.out), label="felix splice bench") if args.out else contextlib.nullcontext()
    with held, own_out:
        if keep is not None and not args.resume and PatchStack.open(keep).list():
            raise FelixError(f"--keep-patches {keep}: already holds patches (the bench starts from an empty stack)")
        # on a `felix quantize` artifact the stack is measured folded onto its grid, as `felix splice apply` judges
        # it and the artifact's loaders serve it
        fold = StackFold.of_checkpoint(ckpt, model, stored=False) if ckpt.quant_format in GPTQ_FORMATS else None
        # re-quantized onto a codebook artifact's own grid, over the served fold's text (so `requantized_gptq` is
        # the served model whatever --preserve-windows says); otherwise onto RQ4, the deployment format
        fmt = fold.fmt if fold is not None else "rq4"
        gptq_text = fold.preserve if fold is not None else preserve
        plain = requantizer(fmt)
        requantizers = {"requantized": lambda m, _applied: plain(m),
                        "requantized_gptq": lambda m, applied: gptq_requantizer(gptq_text, applied, fmt)(m)}
        # the pin search never sees the evaluation's own prompts, so the held-out neighbours stay unseen
        withheld = [p for r in requests[: args.n] for p in [r.prompt, *r.paraphrases, *r.neutral]]
        pins = _text_pins(args, cfg, ckpt, model, tok, withheld)
        prompts, dropped = _preserve_prompts(args, tok, model.cfg.max_seq_len, withheld)
        if dropped:
            print(f"note: {dropped} preservation prompts are the bench's own prompts and were left out",
                  file=sys.stderr)
        # the first line of progress comes only after the references and the first edit (4 min at 117.89M on a core)
        print(f"bench: {'continuing' if args.resume else 'starting'} {args.n} edits: the unedited model's references "
              "are measured first, then a line per edit; after the last, the final state is re-quantized "
              f"({fmt}: plain and GPTQ)", file=sys.stderr, flush=True)
        try:
            result = run_bench(model, tok, requests, args.n, cfg, heldout, preserve, stack_dir=keep, pins=pins,
                               preserve_prompts=prompts, record_inputs=_edit_inputs(args, len(prompts)),
                               requantizers=requantizers, heldout_neutral=args.heldout_neutral, log=log, fold=fold,
                               progress=progress, resume=args.resume)
        except KeyboardInterrupt:
            if progress is not None and progress.exists():
                again = shlex.join(["felix", *sys.argv[1:], *([] if args.resume else ["--resume"])])
                print(f"the bench's progress is in {progress}; continue it with: {again}", file=sys.stderr)
            raise
        result["final"]["requantized_format"] = fmt
        if args.out:
            out = Path(args.out)
            atomic_write_text(out / "bench.json", json.dumps(result, indent=1, default=str))
            result["final"]["plot"] = str(plot_bench(result, out / "bench.png", f"felix splice bench ({cfg.method})"))
            progress.unlink(missing_ok=True)
    if args.json:
        print_json(result["final"] | {"steps": result["steps"]})
    else:
        print(json.dumps({k: v for k, v in result["final"].items() if k != "rejections"}, indent=1, default=str))
    return 0


def make_edits_verb(args: argparse.Namespace, model, tok, ckpt, stack) -> int:
    """splice make-edits: write counterfactual edit requests from facts the model already predicts."""
    from felix.facts import stdlib_facts
    from felix.splice_data import NextTokenShares, checkpoint_mix, corpus_documents, make_edits
    from felix.splice_edit import save_requests
    from felix.splice_facts import make_fact_edits, preservation_path

    stack.restore(model)
    if args.n <= 0:
        raise FelixError("--n must be positive")
    if args.lines_per_doc <= 0:
        raise FelixError(f"--lines-per-doc must be positive, got {args.lines_per_doc}")
    if not 0 < args.max_habit <= 1:
        raise FelixError(f"--max-habit must be in (0, 1], got {args.max_habit}")
    facts = args.source == "facts"
    if args.preserve_out and not facts:
        raise FelixError("--preserve-out needs --source facts (the prompts of the facts not edited)")
    if args.preserve_out and Path(args.preserve_out).resolve() == Path(args.out).resolve():
        raise FelixError(f"--preserve-out {args.preserve_out} is --out: the preservation prompts would replace "
                         "the edits")
    # named now, not as a traceback once the facts are found
    # make_parents=False: the edits are written atomically beside --out, which makes no directory
    check_output(args.out, "--out", directory=False, make_parents=False)
    if facts:
        check_output(args.preserve_out or preservation_path(args.out), "--preserve-out", directory=False,
                     make_parents=False)
    if facts and "facts" not in checkpoint_mix(ckpt).targets():
        raise FelixError(f"{ckpt.path}: its data mix has no 'facts' source (train with `felix demo --facts-weight W`)")
    docs = None if facts else corpus_documents(ckpt, tok, args.source, seed=args.seed)
    shares = NextTokenShares.of_checkpoint(ckpt, model.cfg.vocab_size) if args.max_habit < 1 else None
    if facts:
        reqs = make_fact_edits(model, tok, stdlib_facts(), args.n, seed=args.seed, shares=shares,
                               max_habit=args.max_habit)
    else:
        reqs = make_edits(model, tok, docs, args.n, seed=args.seed, shares=shares, max_habit=args.max_habit,
                          lines_per_doc=args.lines_per_doc)
    save_requests(args.out, reqs)
    preserved = {}
    if facts:  # the prompts edits of facts should leave alone (EXP-46ah), beside the edits
        from felix.splice_data import save_prompts
        from felix.splice_facts import preservation_prompts

        path = args.preserve_out or str(preservation_path(args.out))
        prompts = preservation_prompts(stdlib_facts(), reqs)
        save_prompts(path, prompts)
        preserved = {"preserve_out": path, "preserve_prompts": len(prompts)}
    if args.json:
        print_json({"out": args.out, "n": len(reqs)} | preserved)
    else:
        print(f"wrote {len(reqs)} edit requests to {args.out}" + (
            f" and {preserved['preserve_prompts']} preservation prompts to {preserved['preserve_out']} "
            f"(--preserve-prompts)" if preserved else ""))
    return 0
