"""`felix splice`: diagnose, apply, roll back and list SpliceCore edits; bench sequential edits; build edit
sets from facts the model holds (make-edits).

Applied edits are patches in the checkpoint's patch stack (`CHECKPOINT/splices/`, felix.patches): every
verb that reads the model first restores that stack, so what it sees is what a server would serve.
"""

from __future__ import annotations

import argparse

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag, int_at_least
from felix.commands.splice_edits import apply_verb, bench_verb, edit_requests, make_edits_verb
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
        v.add_argument("--checkpoint", required=True,
                       help="run dir (latest checkpoint), checkpoint dir or `felix quantize` artifact")
        v.add_argument("--device", default="cpu",
                       help="torch device the model runs on, e.g. cpu or cuda (ROCm too) (default cpu)")
        add_json_flag(v)
        return v

    def request_args(v: argparse.ArgumentParser) -> None:
        v.add_argument("--prompt", help="the prompt whose continuation the edit changes")
        v.add_argument("--target", help="the continuation the edited model should give")
        v.add_argument("--paraphrase", action="append", default=[],
                       help="another prompt that should give the target too (repeatable)")
        v.add_argument("--neutral", action="append", default=[],
                       help="a prompt whose continuation must not change (repeatable)")

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
        v.add_argument("--delta-steps", type=int,
                       help=f"closed forms: most steps of the wanted-change search (default {defaults.delta_steps})")
        v.add_argument("--delta-lr", type=float,
                       help=f"closed forms: Adam lr of the wanted-change search (default {defaults.delta_lr:g})")
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
    b.add_argument("--out", help="directory for bench.json and bench.png; until the bench ends it also holds "
                                 "its progress, written after every edit")
    b.add_argument("--resume", action="store_true",
                   help="continue the unfinished bench in --out (same checkpoint, edits and options)")
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


def run(args: argparse.Namespace) -> int:
    from felix.model_loader import load_model
    from felix.patches import lock_stack

    model, tok, ckpt = load_model(args.checkpoint, args.device)
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
    # apply, bench and make-edits, and the edit options they share, are in felix.commands.splice_edits.
    # Handlers get the model as checkpointed; those that work on the edited model restore the patch stack
    # themselves (apply measures the total-drift origin first, the bench never restores it).
    handler = {"diagnose": _diagnose, "apply": apply_verb, "rollback": _rollback, "list": _list,
               "bench": bench_verb, "make-edits": make_edits_verb}[args.splice_verb]
    return handler(args, model, tok, ckpt, stack)


def _diagnose(args, model, tok, ckpt, stack) -> int:
    from felix.splice_data import examples_of
    from felix.splice_diagnose import diagnose

    stack.restore(model)
    req = edit_requests(args)[0]
    out = diagnose(model, tok, examples_of(tok, req, model.cfg.max_seq_len)[0], k=args.k)
    if args.json:
        print_json(out)
        return 0
    print(f"predicted {out['predicted_token']!r} (id {out['predicted_id']}), "
          f"target {out['target_token']!r} (id {out['target_id']})")
    print("logit lens (residual after each block -> norm -> lm_head):")
    for row in out["logit_lens"]:
        print(f"  block {row['layer']}{'*' if row['splice'] else ' '} target rank {row['target_rank']:>5} "
              f"p={row['target_prob']:.4f}   top {row['top_token']!r} (id {row['top_id']}) p={row['top_prob']:.3f}")
    for L, v in out["layers"].items():
        print(f"  SpliceCore layer {L}: CCI@{args.k}={v['cci']:.3f} attribution share {v['attribution_share']:.2f} "
              f"ablation effect {v['ablation_effect']:+.3f}")
    print(f"pooled CCI@{args.k} = {out[f'cci@{args.k}']:.3f}; edit layers {out['chosen_layers']}")
    return 0


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
    rows = [{"id": p.id, "names": p.names, "absolute": p.absolute, "record": p.record} for p in stack.list()]
    if args.json:
        print_json({"patches": rows})
        return 0
    if not rows:
        print("no patches")
    for r in rows:
        record = r["record"]
        print(f"{r['id']}  {record.get('time', '')}  {record.get('method', '?'):<13} "
              f"{'absolute' if r['absolute'] else 'relative'}  {_tensors(r['names'])}  {_what(record)}")
    return 0


def _tensors(names: list[str]) -> str:
    """SpliceCore tensor names, short: `L1.a,b L3.gate`."""
    from felix.splicecore import splice_tensor_layer

    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(splice_tensor_layer(n), []).append(n.rsplit(".", 1)[1])
    return " ".join(f"L{layer}.{','.join(kinds)}" for layer, kinds in sorted(by_layer.items()))


def _what(record: dict) -> str:
    """What a patch did, for `list`'s text: a fact edit's request, a push's tensor, a gate edit's biases."""
    req = record.get("request")
    if not isinstance(req, dict):
        return ""
    if "prompt" in req:
        extra = [f"id {req['id']!r}"] if req.get("id") is not None else []
        if (layers := (record.get("metrics") or {}).get("layers")) is not None:
            extra.append(f"layers {layers}")
        if record.get("folded_to"):
            extra.append(f"folded to {record['folded_to']}")
        what = f"{str(req['prompt'])[-30:]!r} -> {req.get('target', '')!r}"
        return what + (f" ({', '.join(extra)})" if extra else "")
    if "gate_biases" in req:
        return f"gate biases {req['gate_biases']}"
    return ", ".join(f"{k} {v}" for k, v in req.items() if k in ("name", "format", "rounding"))
