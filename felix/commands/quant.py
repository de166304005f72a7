"""`felix quant survival`: what a checkpoint loses under a deployment format, where QUAIL cares most."""

from __future__ import annotations

import argparse
import json

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag, int_at_least

SURVIVAL_HELP = """Compare a checkpoint at full precision against the same weights fake-quantized under FMT
(exactly what the packed artifact of `felix quantize` computes) and report:

  whitelisted   the refusal probe set: held-out val positions whose target is a whitelisted token
                (the checkpoint config's quail.tokens, or --tokens), prompted with the 64 tokens before.
                top-1 agreement full vs quantized, refusal rate (greedy next token whitelisted) full
                and quantized, survival (share of positions the full model gets right that the
                quantized one still gets right), margin z_target - max other (quantiles)
  val           perplexity full and quantized, KL(full || quantized) per token, top-1 agreement,
                false-refusal rate (greedy token whitelisted where the target is not)
  json_validity task-suite dev prompts, greedy completion, parsed by felix.tasks.parse
                (about 0 for demo-scale models)

A checkpoint's applied splices (CHECKPOINT/splices/) are part of both models: full precision is the
model as edited, quantized is what `felix quantize` packs from it (--splice-rounding, as there).

--plot FILE writes the margin histograms (full vs quantized) as a PNG. FILE is checked before the work:
its directory must exist, it may not lie in the checkpoint, and an existing file there must be a PNG
(an earlier plot, replaced); a symlink is written through. Without a whitelisted position in the probe
windows there is nothing to plot: the report says so (plot_skipped) and FILE is not written.
"""


def register(sub: argparse._SubParsersAction, help: str) -> None:
    from felix.quant_formats import FORMATS
    from felix.quantize import EMBEDDING_POLICIES

    p = sub.add_parser("quant", help=help, description="Quantization reports: survival compares a checkpoint "
                       "with its quantized self (whitelisted tokens, perplexity, KL).")
    verbs = p.add_subparsers(dest="quant_command", metavar="<report>", required=True)
    s = verbs.add_parser("survival", help="full precision vs quantized: whitelisted tokens, ppl, KL",
                         description=SURVIVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--checkpoint", required=True, help="run dir (latest checkpoint) or checkpoint dir")
    s.add_argument("--format", required=True, choices=list(FORMATS), help="weight format to compare against")
    s.add_argument("--tokens", nargs="+", metavar="STR", help="whitelist (default: the config's quail.tokens)")
    s.add_argument("--embeddings", choices=EMBEDDING_POLICIES, default="quantize",
                   help="token embedding / output head: the format (default), q8_0, or keep (fp16)")
    s.add_argument("--splice-rounding", choices=["auto", "gptq", "plain"], default="auto",
                   help="applied splices' SpliceCore tensors as `felix quantize` rounds them: GPTQ (a codebook "
                        "format only: rq4, rq3, nf4) or plainly; auto (default): gptq for the codebook formats, "
                        "plain for q8_0/q4_0")
    s.add_argument("--json-prompts", type=int_at_least(0), default=4,
                   help="task prompts for the JSON-validity rate (default 4; 0: skip)")
    s.add_argument("--probe-limit", type=int_at_least(0), default=256,
                   help="most whitelisted positions to probe (default 256)")
    s.add_argument("--val-windows", type=int_at_least(1), default=16,
                   help="val windows per mix source for ppl/KL (default 16)")
    s.add_argument("--plot", metavar="FILE", help="PNG file for the margin distributions (an existing one is "
                   "replaced; any other existing file is refused)")
    add_json_flag(s)
    s.set_defaults(func=run_survival)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def render(r: dict) -> str:
    """The report as a few readable lines."""
    w, v, j = r["whitelisted"], r["val"], r["json_validity"]
    lines = [f"survival of {r['checkpoint']} under {r['format']} (embeddings: {r['embeddings']})",
             f"whitelist {r['whitelist']['tokens']}: {w['positions']} held-out positions"]
    if sp := r.get("splices"):
        lines.insert(1, f"splices: {sp['patches']} patches applied ({sp['fact_edits']} fact edits), "
                        f"SpliceCore rounded {sp['rounding']}")
    if w["positions"]:
        mf, mq = w["margin_full"], w["margin_quant"]
        lines += [f"  top-1 agreement {_fmt(w['top1_agreement'], True)}, survival {_fmt(w['survival'], True)}",
                  f"  refusal rate full {_fmt(w['refusal_rate_full'], True)} -> quantized "
                  f"{_fmt(w['refusal_rate_quant'], True)}",
                  f"  margin median full {_fmt(mf['median'])} / quantized {_fmt(mq['median'])}, "
                  f"p05 {_fmt(mf['p05'])} / {_fmt(mq['p05'])}"]
    lines.append(f"val ({v['tokens']} tokens): ppl {_fmt(v['ppl_full'])} -> {_fmt(v['ppl_quant'])}, "
                 f"KL {_fmt(v['kl'])} nats/token, top-1 agreement {_fmt(v['top1_agreement'], True)}, "
                 f"false refusals {_fmt(v['false_refusal_full'], True)} -> {_fmt(v['false_refusal_quant'], True)}")
    if j["prompts"]:
        lines.append(f"JSON validity ({j['prompts']} task prompts): full {_fmt(j['valid_full'], True)}, "
                     f"quantized {_fmt(j['valid_quant'], True)}")
    if r.get("plot"):
        lines.append(f"margin plot: {r['plot']}")
    elif r.get("plot_skipped"):
        lines.append(f"margin plot skipped: {r['plot_skipped']}")
    return "\n".join(lines)


def run_survival(args: argparse.Namespace) -> int:
    import contextlib

    from felix.checkpoint import resolve_checkpoint
    from felix.errors import FelixError
    from felix.survival import check_plot_path, plot_margins, survival_report

    if args.plot:  # found before the report's minutes of work, not after them
        checkpoint = None
        with contextlib.suppress(FelixError):  # not a checkpoint: survival_report says so
            checkpoint = resolve_checkpoint(args.checkpoint)
        check_plot_path(args.plot, checkpoint if checkpoint is not None else args.checkpoint)
    report = survival_report(args.checkpoint, args.format, args.tokens, args.embeddings, args.json_prompts,
                             args.probe_limit, args.val_windows, keep_margins=bool(args.plot),
                             splice_rounding=args.splice_rounding)
    margins = report.pop("margins", None)
    plot_error = None
    if args.plot and margins is not None:
        try:
            written = plot_margins({f"{args.format}": margins}, args.plot, title=report["checkpoint"])
        except FelixError as exc:  # changed since the check (a full disk): the report is still printed
            written, plot_error = None, exc
        report["plot"] = str(written) if written else None
        if written is None:  # plot_margins draws nothing without a whitelisted position: say so, not nothing
            report["plot_skipped"] = (f"no whitelisted position in the probe windows (whitelist "
                                      f"{report['whitelist']['tokens']}): no margins to plot; {args.plot} not written")
    if args.json:
        print_json(json.loads(json.dumps(report)))
    else:
        print(render(report))
    if plot_error is not None:
        raise plot_error
    return 0
