"""`felix splice`: diagnose, apply, roll back and list SpliceCore edits; bench sequential edits; build edit
sets from facts the model holds (make-edits).

Applied edits are patches in the checkpoint's patch stack (`CHECKPOINT/splices/`, felix.patches): every
verb that reads the model first restores that stack, so what it sees is what a server would serve.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

from felix.atomic import atomic_write_text
from felix.cli import print_json
from felix.commands.arg_types import add_json_flag, int_at_least
from felix.errors import FelixError


def register(sub: argparse._SubParsersAction, help: str) -> None:
    from felix.splice_config import EditConfig
    from felix.splice_data import HELDOUT_WINDOWS, PRESERVE_WINDOWS
    from felix.splice_pins import PIN_WINDOWS

    p = sub.add_parser("splice", help=help,
                       description=__doc__)
    verbs = p.add_subparsers(dest="splice_verb", metavar="<action>", required=True)

    defaults = EditConfig()

    def base(name: str, help_: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        v.add_argument("--checkpoint", required=True, help="run dir (latest checkpoint) or checkpoint dir")
        add_json_flag(v)
        return v

    def request_args(v: argparse.ArgumentParser) -> None:
        v.add_argument("--prompt", help="the prompt whose continuation the edit changes")
        v.add_argument("--target", help="the continuation the edited model should give")
        v.add_argument("--paraphrase", action="append", default=[], help="repeatable")
        v.add_argument("--neutral", action="append", default=[], help="repeatable")

    def method_args(v: argparse.ArgumentParser) -> None:
        v.add_argument("--method", choices=["kl_train", "closed_form", "closed_form_a"], default=None,
                       help=f"edit method (default {defaults.method})")
        v.add_argument("--layers", type=_layer_list, default=None,
                       help="comma-separated SpliceCore layers (default: chosen by diagnosis)")
        v.add_argument("--steps", type=int, help=f"kl_train: optimizer steps (default {defaults.steps})")
        v.add_argument("--lr", type=float, help=f"kl_train: learning rate (default {defaults.lr:g})")
        v.add_argument("--kl-weight", type=float,
                       help=f"kl_train: weight of the KL term on neutral prompts (default {defaults.kl_weight:g})")
        v.add_argument("--train", choices=["ab", "b"], help="kl_train: SpliceCore tensors to move (default ab)")
        v.add_argument("--optimizer", choices=["adam", "sgd"], help="kl_train: optimizer (default adam)")
        v.add_argument("--delta-steps", type=int, help="closed forms: steps of the wanted-change search")
        v.add_argument("--delta-lr", type=float, help="closed forms: Adam lr of the wanted-change search")
        v.add_argument("--margin", type=float,
                       help="nats by which every target token must win before a search stops (default 1)")
        v.add_argument("--max-ppl-increase", type=float, help="relative, default 0.005 (0.5%%)")
        v.add_argument("--max-neutral-kl", type=float,
                       help="budget: most mean KL(before || after) on the neutral prompts "
                            f"(default {defaults.max_neutral_kl:g})")
        v.add_argument("--preserve-windows", type=int, default=PRESERVE_WINDOWS,
                       help="training windows (128 tokens) whose behaviour and keys edits protect "
                            f"(default {PRESERVE_WINDOWS})")
        v.add_argument("--heldout-windows", type=int, default=HELDOUT_WINDOWS,
                       help="validation windows (128 tokens) over the mix's sources, weighted as the mix weights "
                            f"them, whose perplexity the budget and the drift read (default {HELDOUT_WINDOWS})")
        v.add_argument("--max-total-ppl-increase", type=float,
                       help="relative to the checkpoint before any patch (default: no total bound)")
        v.add_argument("--protect-neutral", action=argparse.BooleanOptionalAction, default=None,
                       help="closed_form_a: keep the request's own neutral prompts unchanged (default on)")
        v.add_argument("--protect-suite", action="store_true", default=None,
                       help="closed_form_a: also keep the neutral prompts of the edits already applied unchanged")
        v.add_argument("--neutral-tokens", type=int,
                       help="closed_form_a: positions kept per neutral prompt, along its greedy continuation "
                            "(default 1: the next token)")
        v.add_argument("--context-keys", type=int,
                       help="closed_form_a: also write each edit at its prompt's last line behind this many other "
                            "contexts from the training text, for paraphrases (default 0)")
        v.add_argument("--text-pins", type=int,
                       help="closed_form_a: also keep unchanged the N training-text positions (one per line) each "
                            "edit's write would reach most; an edit they push over the budget is retried without "
                            "them (default 0; docs/splicing.md, Where locality goes)")
        v.add_argument("--pin-windows", type=int, default=PIN_WINDOWS,
                       help=f"training windows (128 tokens) searched for text pins (default {PIN_WINDOWS})")
        v.add_argument("--preserve-prompts", metavar="FILE",
                       help="closed_form_a: JSONL of {\"prompt\": ...} whose next-token inputs join the preservation "
                            "text's in C, so edits leave prompts of their kind alone (docs/splicing.md; EXP-46ah)")
        v.add_argument("--prompt-weight", type=float,
                       help="closed_form_a: the weight of their moment against the text's (default 3, EXP-46ai)")
        v.add_argument("--prompt-tokens", type=int,
                       help="closed_form_a: keep each preservation prompt's first N greedy tokens, not only its "
                            "next one, which then weighs as much as the rest (default 1; EXP-46ak)")
        v.add_argument("--prompt-repair", type=int,
                       help="closed_form_a: solve each write again, up to N times, with the preservation prompts "
                            "whose next token it changed kept exactly (default 0; EXP-46aq)")
        v.add_argument("--repair-drop", type=float, metavar="NATS",
                       help="with --prompt-repair: also keep the prompts whose next token stayed but lost at "
                            "least NATS of its lead over the runner-up (default: only changed next tokens)")

    d = base("diagnose", "logit lens and causal concentration (CCI@k) for one prompt/target")
    request_args(d)
    d.add_argument("--k", type=int_at_least(1), default=5,
                   help="top-k components whose share of the effect CCI@k reports (default 5)")
    a = base("apply", "apply edits within the regression budget, as patches")
    a.description = ("Apply edits within the regression budget, as patches beside the checkpoint. On a `felix "
                     "quantize` artifact the patches stay unrounded and the whole stack is GPTQ-rounded once "
                     "to the artifact's format wherever it is served (generate, serve, export); each edit must "
                     "hold in that rounding, and its own cost is judged unrounded (docs/splicing.md, Deploying "
                     "an edited model).")
    request_args(a)
    a.add_argument("--edits", help="JSONL edit requests (docs/splicing.md)")
    method_args(a)
    r = base("rollback", "roll back one patch (exact prior tensors)")
    r.add_argument("--id", help="patch id (default: the top patch)")
    base("list", "list the applied patches")
    b = base("bench", "apply N edits in sequence and measure success, retention, locality and drift")
    b.add_argument("--edits", required=True, help="JSONL edit requests (docs/splicing.md)")
    b.add_argument("--n", type=int, required=True, help="how many of them to apply, in file order")
    b.add_argument("--out", help="directory for bench.json and bench.png")
    b.add_argument("--heldout-neutral", action="store_true",
                   help="keep every other neutral prompt from the edits and report its locality apart")
    b.add_argument("--keep-patches", metavar="DIR",
                   help="keep the applied edits as a patch stack in DIR (default: a temporary one, discarded)")
    method_args(b)
    m = base("make-edits", "build a counterfactual edit set from facts the model holds")
    m.description = ("Build counterfactual edit requests (JSONL, for splice apply/bench --edits) from facts the "
                     "model already predicts: lines of a mix source's text, or the demo's facts.")
    m.add_argument("--out", required=True, help="JSONL file the edit requests are written to")
    m.add_argument("--n", type=int, required=True, help="how many edit requests to make")
    m.add_argument("--source", metavar="NAME",
                   help="where facts come from: a source of the checkpoint's data mix, e.g. code or docs (default: "
                        "the first), or facts: the standard library's tables the demo's facts source states "
                        "(felix.facts)")
    m.add_argument("--seed", type=int, default=0, help="seed of the fact sampling (default 0)")
    m.add_argument("--max-habit", type=float, default=0.05,
                   help="leave out facts whose target follows the prompt's last token in at least this share "
                        "of its occurrences in the training text (default 0.05; 1 keeps every fact)")
    m.add_argument("--preserve-out", metavar="FILE",
                   help="facts: where to write the prompts of every fact the edits do not name (edited, paraphrase "
                        "or neutral), for --preserve-prompts (default: beside --out, as STEM.preserve.jsonl)")
    m.add_argument("--lines-per-doc", type=int, default=48,
                   help="code lines sampled per document as fact candidates (default 48)")
    p.set_defaults(func=run)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, e.g. 1,3; got {text!r}") from None


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


def _requests(args: argparse.Namespace):
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


def run(args: argparse.Namespace) -> int:
    from felix.model_loader import load_model
    from felix.patches import lock_stack

    model, tok, ckpt = load_model(args.checkpoint)
    if args.splice_verb not in ("apply", "rollback"):
        return _run(args, model, tok, ckpt)
    # the writers hold the stack from before they read it to their end: a `felix serve` of this checkpoint
    # holds it for its life, so this is refused now, naming it, not after minutes of work (felix.patches)
    with lock_stack(ckpt.path, f"felix splice {args.splice_verb}"):
        return _run(args, model, tok, ckpt)


def _run(args: argparse.Namespace, model, tok, ckpt) -> int:
    from felix.patches import PatchStack

    stack = PatchStack.open(ckpt.path)
    if not model.cfg.splice_layers:
        raise FelixError(f"{ckpt.path}: this model has no SpliceCore layers")
    # checked here, not deep in a method after minutes of setup (a KeyError there)
    if bad := [L for L in getattr(args, "layers", None) or [] if L not in model.cfg.splice_layers]:
        raise FelixError(f"--layers {bad}: not SpliceCore layers of this model (it has {model.cfg.splice_layers})")
    # Handlers get the model as checkpointed; those that work on the edited model restore the patch stack
    # themselves (apply measures the total-drift origin first, the bench never restores it).
    handler = {"diagnose": _diagnose, "apply": _apply, "rollback": _rollback, "list": _list, "bench": _bench,
               "make-edits": _make_edits}[args.splice_verb]
    return handler(args, model, tok, ckpt, stack)


def _diagnose(args, model, tok, ckpt, stack) -> int:
    from felix.splice_data import examples_of
    from felix.splice_diagnose import diagnose

    stack.restore(model)
    req = _requests(args)[0]
    out = diagnose(model, tok, examples_of(tok, req, model.cfg.max_seq_len)[0], k=args.k)
    if args.json:
        print_json(out)
        return 0
    print(f"predicted {out['predicted_token']!r}, target {out['target_token']!r}")
    print("logit lens (residual after each block -> norm -> lm_head):")
    for row in out["logit_lens"]:
        print(f"  block {row['layer']}{'*' if row['splice'] else ' '} target rank {row['target_rank']:>5} "
              f"p={row['target_prob']:.4f}   top {row['top_token']!r} p={row['top_prob']:.3f}")
    for L, v in out["layers"].items():
        print(f"  SpliceCore layer {L}: CCI@{args.k}={v['cci']:.3f} attribution share {v['attribution_share']:.2f} "
              f"ablation effect {v['ablation_effect']:+.3f}")
    print(f"pooled CCI@{args.k} = {out[f'cci@{args.k}']:.3f}; edit layers {out['chosen_layers']}")
    return 0


def _apply(args, model, tok, ckpt, stack) -> int:
    from felix.heldout import heldout_nll
    from felix.splice_config import EditContext
    from felix.splice_covariance import InputCovariances
    from felix.splice_data import context_variants, examples_of, splice_texts, stack_edits, stack_neutral
    from felix.splice_diagnose import diagnose
    from felix.splice_edit import patch_record, propose_edit
    from felix.splice_examples import prompt_ids
    from felix.splice_fold import StackFold
    from felix.splice_quant import GPTQ_FORMATS

    cfg = _config(args)
    heldout, preserve = splice_texts(ckpt, model, args.preserve_windows, args.heldout_windows)
    origin_nll = heldout_nll(model, heldout) if cfg.max_total_ppl_increase is not None else None
    stack.restore(model)
    # on a `felix quantize` artifact the stack keeps unrounded edits and is rounded once, as a whole, where
    # it is served (EXP-46z), on the text every loader folds with; each edit must hold in that rounding
    fold = StackFold.of_checkpoint(ckpt, model) if ckpt.quant_format in GPTQ_FORMATS else None
    prompts = _preserve_prompts(args, tok, model.cfg.max_seq_len)[0]
    covariances = InputCovariances(preserve, prompts, cfg.prompt_weight, cfg.prompt_tokens)
    inputs = _edit_inputs(args, len(prompts))
    pins = _text_pins(args, cfg, ckpt, model, tok)
    results, rejected = [], 0
    for req in _requests(args):
        ex, paras = examples_of(tok, req, model.cfg.max_seq_len)
        prior = stack_edits(stack, tok, model.cfg.max_seq_len)
        layers = cfg.layers or diagnose(model, tok, ex)["chosen_layers"]
        max_len = model.cfg.max_seq_len
        ctx = EditContext(preserve, [prompt_ids(tok, n, max_len) for n in req.neutral], prior, covariances,
                          suite=[prompt_ids(tok, n, max_len) for n in stack_neutral(stack)],
                          variants=context_variants(tok, req, preserve, cfg.context_keys, model.cfg.max_seq_len),
                          pins=pins, pin_exclude=(req.prompt, *req.paraphrases), preserve_prompts=prompts)
        out = propose_edit(model, ex, layers, ctx, heldout, cfg, paras, origin_nll=origin_nll, fold=fold)
        row = {"request": req.to_dict(), "accepted": out.accepted, "reason": out.reason, "metrics": out.metrics}
        if out.accepted:
            patch = stack.apply(model, out.after, patch_record(req, cfg, out.metrics, inputs,
                                                               fold.fmt if fold else None))
            row["patch_id"] = patch.id
            if fold is not None:  # the fold just judged is the one every loader will serve: store it
                fold.record(fold.digest(model, [*prior, ex]), out.served)
        else:
            rejected += 1
        results.append(row)
        if not args.json:
            m = out.metrics
            print(f"{'applied ' + row['patch_id'] if out.accepted else 'REJECTED'}: {req.prompt[-40:]!r} -> "
                  f"{req.target!r} [{cfg.method}, layers {layers}] success={m['success']} "
                  f"ppl {100 * m['ppl_increase']:+.3f}% KL {m['neutral_kl']:.4f}"
                  + ("" if out.accepted else f" ({out.reason})"))
    if args.json:
        print_json({"results": results, "applied": len(results) - rejected, "rejected": rejected})
    return 1 if rejected else 0


def _rollback(args, model, tok, ckpt, stack) -> int:
    stack.restore(model)
    top = stack.top()
    pid = args.id or (top.id if top else None)
    if pid is None:
        raise FelixError("the patch stack is empty: nothing to roll back")
    stack.rollback(model, pid)
    if args.json:
        print_json({"rolled_back": pid, "remaining": [p.id for p in stack.list()]})
    else:
        print(f"rolled back {pid}; {len(stack.list())} patches remain")
    return 0


def _list(args, model, tok, ckpt, stack) -> int:
    stack.restore(model)
    rows = [{"id": p.id, "names": p.names, "record": p.record} for p in stack.list()]
    if args.json:
        print_json({"patches": rows})
        return 0
    if not rows:
        print("no patches")
    for r in rows:
        req = r["record"].get("request", {})
        print(f"{r['id']}  {r['record'].get('time', '')}  {r['record'].get('method', '?'):<11} "
              f"{req.get('prompt', '')[-30:]!r} -> {req.get('target', '')!r}")
    return 0


def _bench(args, model, tok, ckpt, stack) -> int:
    from felix.patches import PatchStack, lock_stack
    from felix.splice_bench import plot_bench, run_bench
    from felix.splice_data import splice_texts
    from felix.splice_edit import load_requests
    from felix.splice_fold import StackFold
    from felix.splice_quant import GPTQ_FORMATS, gptq_requantizer, requantizer

    if args.n <= 0:
        raise FelixError("--n must be positive")
    requests = load_requests(args.edits)
    if len(requests) < args.n:
        raise FelixError(f"{args.edits} holds {len(requests)} edits, fewer than --n {args.n}")
    cfg = _config(args)

    started = time.perf_counter()

    def log(row):  # progress on stderr, with --json too: a 100-edit bench runs for tens of minutes
        elapsed = time.perf_counter() - started
        eta = elapsed / row["step"] * (args.n - row["step"])
        print(f"step {row['step']:>3}/{args.n} {'ok ' if row['success'] else 'BAD'} retention {row['retention']:.2f} "
              f"locality {row.get('locality', 1):.2f} ppl drift {100 * row['ppl_drift']:+.2f}%  "
              f"[{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min]"
              + ("" if row["accepted"] else f"  rejected: {row['reason']}"), file=sys.stderr, flush=True)

    heldout, preserve = splice_texts(ckpt, model, args.preserve_windows, args.heldout_windows)
    keep = Path(args.keep_patches) if args.keep_patches else None
    # the kept stack is written for the whole bench, so it is held as `apply` holds a checkpoint's (it may be one)
    held = lock_stack(keep, "felix splice bench --keep-patches") if keep is not None else contextlib.nullcontext()
    with held:
        if keep is not None and PatchStack.open(keep).list():
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
        result = run_bench(model, tok, requests, args.n, cfg, heldout, preserve, stack_dir=keep, pins=pins,
                           preserve_prompts=prompts, record_inputs=_edit_inputs(args, len(prompts)),
                           requantizers=requantizers, heldout_neutral=args.heldout_neutral, log=log, fold=fold)
    result["final"]["requantized_format"] = fmt
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench.json", json.dumps(result, indent=1, default=str))
        result["final"]["plot"] = str(plot_bench(result, out / "bench.png", f"felix splice bench ({cfg.method})"))
    if args.json:
        print_json(result["final"] | {"steps": result["steps"]})
    else:
        print(json.dumps({k: v for k, v in result["final"].items() if k != "rejections"}, indent=1, default=str))
    return 0


def _make_edits(args, model, tok, ckpt, stack) -> int:
    from felix.facts import stdlib_facts
    from felix.splice_data import NextTokenShares, checkpoint_mix, corpus_documents, make_edits
    from felix.splice_edit import save_requests
    from felix.splice_facts import make_fact_edits

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
        from felix.splice_facts import preservation_path, preservation_prompts

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
