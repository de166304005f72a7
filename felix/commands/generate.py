"""`felix generate`: sample a continuation from a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from felix.cli import print_json
from felix.commands.arg_types import add_json_flag
from felix.errors import FelixError


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("generate", help=help,
                       description="Continue a prompt with a trained FelixLM, with its applied splices "
                                   "(CHECKPOINT/splices/) as `felix serve` would.")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or quantized artifact")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (sampling options then change nothing)")
    # None: not given (--greedy warns of one given with it); SAMPLING_DEFAULTS fills them in
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample from the k likeliest tokens; 0: no top-k cut (default 50)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1] (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    add_json_flag(p)
    p.set_defaults(func=run)


SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 50, "top_p": 1.0}


def run(args: argparse.Namespace) -> int:
    import torch

    from felix.generate import check_sampling, stream_tokens
    from felix.model_loader import load_model

    # checked before the model loads: a typo should not cost a checkpoint read
    if args.max_new_tokens <= 0:
        raise FelixError("--max-new-tokens must be positive")
    given = [f"--{k.replace('_', '-')}" for k in SAMPLING_DEFAULTS if getattr(args, k) is not None]
    if args.greedy and given:  # as transformers' generate warns of sampling options without do_sample
        warnings.warn(f"--greedy decodes by argmax: {' and '.join(given)} change nothing", stacklevel=2)
    for k, default in SAMPLING_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.greedy,
                       name=lambda n: "--" + n.replace("_", "-"))
    except ValueError as exc:
        raise FelixError(str(exc)) from None
    try:  # torch takes seeds in [-2**63, 2**64); past that manual_seed raises ValueError "Overflow ..."
        torch.Generator().manual_seed(args.seed)
    except (ValueError, RuntimeError):
        raise FelixError(f"--seed must be in [-2**63, 2**64), got {args.seed}") from None
    model, tok, _ = load_model(args.checkpoint, args.device, splices=True)
    ids = tok.encode(args.prompt)
    room = model.cfg.max_seq_len - len(ids)
    if 0 < room < args.max_new_tokens:  # no room at all is an error from stream_tokens
        print(f"note: at most {room} new tokens fit the model's context of {model.cfg.max_seq_len} after this "
              f"{len(ids)}-token prompt", file=sys.stderr)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    stops = tok.stop_ids  # end of document or of a turn, as the server stops
    out: list[int] = []
    t0 = time.perf_counter()
    try:
        stream = stream_tokens(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, greedy=args.greedy, stop_ids=stops, generator=gen)
        if not args.json:
            sys.stdout.write(args.prompt)
        printed = 0
        for t in stream:
            out.append(t)
            if args.json or t in stops:
                continue
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # hold back a character whose bytes are still arriving
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
    except ValueError as exc:
        raise FelixError(str(exc)) from None
    seconds = time.perf_counter() - t0
    text = tok.decode([t for t in out if t not in stops])
    if args.json:
        print_json({"prompt": args.prompt, "completion": text, "tokens": len(out), "seconds": seconds,
                    "tok_per_s": len(out) / max(seconds, 1e-9)})
    else:
        sys.stdout.write(text[printed:] + "\n")  # what was held back: the sample may end mid-character
    return 0
