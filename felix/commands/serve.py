"""`felix serve`: the splice server (daemon-compatible splice API + OpenAI-compatible chat)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import TYPE_CHECKING

from felix.errors import FelixError, stop_reason
from felix.signal_handlers import ignore_stop_signals

if TYPE_CHECKING:  # the server imports torch, which the CLI's parser must not
    from felix.server import FelixHTTPServer
    from felix.server_api import SpliceService

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser("serve", help=help,
                       description="Serve a checkpoint over HTTP: the mnemonic daemon's /api/v1 splice and "
                                   "completion API and OpenAI's /v1/chat/completions and /v1/models. Splice "
                                   "writes are saved beside the checkpoint (splices/) and restored on start; "
                                   "while it serves, `felix splice apply/rollback` on that checkpoint are "
                                   "refused (write through the API). "
                                   "Write endpoints need a bearer token from $FELIX_SERVE_TOKEN or --token-file.")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (latest checkpoint), checkpoint dir or `felix quantize` artifact")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8642, help="port (default 8642; 0 picks a free one)")
    p.add_argument("--token-file", help="file holding the write token (else $FELIX_SERVE_TOKEN)")
    p.add_argument("--max-body-mb", type=float, default=16.0,
                   help="largest request body accepted in MB (413 above; default 16)")
    p.add_argument("--model-name", default="felix",
                   help="the model's id: /v1/models reports it, and a chat completion naming another model is a "
                        "404 model_not_found (default felix)")
    p.add_argument("--format", default=None, dest="quant_format",
                   help="deployment format pushed splice tensors are re-quantized to (default: the format of "
                        "a `felix quantize` artifact, the only one it is served in, else f32, i.e. none); an fp32 "
                        "checkpoint served in a format serves its trained SpliceCore as `felix quantize` stores it")
    p.add_argument("--push-rounding", choices=["auto", "fold", "gptq", "plain"], default="auto",
                   help="how pushed tensors are rounded to a codebook format (rq4, rq3, nf4): fold keeps every "
                        "write unrounded in the patch stack and serves the whole stack GPTQ-rounded once, as "
                        "`felix splice apply` leaves an artifact's edits (it re-folds on every write: about 16 s "
                        "at 16.1M parameters on 2 CPU threads); gptq weighs each pushed tensor's inputs on the "
                        "checkpoint's training text, keeping more edits than plain (docs/splicing.md), at a "
                        "forward pass over that text per push (about 1.3 s at 4.6M on one "
                        "thread); plain rounds each weight to its nearest grid value (milliseconds); auto "
                        "(default): fold when the saved stack holds unrounded edits, else gptq when the "
                        "training text is readable, else plain")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, stop accepting and give the splice writes in flight up to this "
                        "long to finish and answer (default 30; a second Ctrl-C stops at once). Completions in "
                        "flight are not waited for (they change nothing; a client can retry), nor does a "
                        "write wait for them")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from felix.server import load_token, make_server
    from felix.server_api import SpliceService

    if not 0 <= args.port <= 65535:
        raise FelixError(f"--port {args.port} is not a port number")
    max_body = args.max_body_mb * (1 << 20)
    if not (math.isfinite(max_body) and max_body >= 1):  # NaN, inf, <= 0, or under a byte (every body a 413)
        raise FelixError(f"--max-body-mb must be a finite size of at least one byte, got {args.max_body_mb}")
    if not (math.isfinite(args.shutdown_grace) and args.shutdown_grace >= 0):
        raise FelixError(f"--shutdown-grace must be a finite number of seconds >= 0, got {args.shutdown_grace}")
    if not args.model_name.strip():  # /v1/models would list a model with a blank id, which no client can name
        raise FelixError(f"--model-name must not be empty or blank, got {args.model_name!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = load_token(args.token_file)
    # closed however serve ends: it lets go of the checkpoint's patch stack (splices/.lock)
    with SpliceService.load(args.checkpoint, args.device, args.model_name, args.quant_format,
                            args.push_rounding) as service:
        server = make_server(service, args.host, args.port, token, int(max_body))
        try:
            announce(server, service, token, args.host)
            # SIGTERM (systemd stop, `kill`) raises RunStopped here as Ctrl-C does (felix.cli.main)
            server.serve_forever()
        except KeyboardInterrupt as exc:
            # exit 0 either way: a server ends by being stopped, with every answered write saved; 143 would
            # mark each `systemctl stop` a failure
            finish_writes(server, args.shutdown_grace, stop_reason(exc))
        finally:
            server.server_close()
    return 0


def announce(server: FelixHTTPServer, service: SpliceService, token: str | None, host: str) -> None:
    """Say on stderr where the server listens, what it serves and what it is open to."""
    from felix.activation_bound import LIMIT

    if token is None:
        print("felix serve: no write token ($FELIX_SERVE_TOKEN or --token-file): splice writes are disabled",
              file=sys.stderr)
    if host not in LOOPBACK:
        print(f"felix serve: listening on {host}, reachable beyond this machine", file=sys.stderr)
    if service.push_rounding_note:
        print(f"felix serve: {service.push_rounding_note}", file=sys.stderr)
    bound = service.bound.of(service.model) if service.splice_layers else None
    if bound is not None and bound.frozen_past_limit:
        print(f"felix serve: this model's frozen weights alone could drive the residual stream to a norm of "
              f"{bound.base:.3g} on some input, past {LIMIT:.3g}, so every splice write will be refused; the bound "
              "is loose, and completions are not affected by it", file=sys.stderr)
    elif bound is not None and (worst := bound.worst()) is not None:
        print(f"felix serve: with the restored patch stack, {worst[0]} could reach a norm of {worst[1]:.3g} on some "
              f"input, past {LIMIT:.3g}: completions may be meaningless (RMSNorm overflows and returns zeros). "
              "Roll back its latest patches (POST /api/v1/splice/rollback, or felix splice rollback while the "
              "server is stopped)", file=sys.stderr)
    rounding = service.push_rounding_name
    print(f"felix serve: {server.url} ({len(service.stack)} patches restored, "
          f"SpliceCore layers {service.splice_layers}"
          f"{f', pushes rounded to {service.quant_format} by {rounding}' if rounding else ''}"
          f"{' with the stack, which is served folded' if rounding == 'fold' else ''})",
          file=sys.stderr, flush=True)


def finish_writes(server: FelixHTTPServer, grace: float, reason: str = "") -> None:
    """Stop accepting and let the writes in flight answer, for up to `grace` seconds or until a second Ctrl-C (a
    repeated SIGTERM changes nothing: `sigterm_interrupts`); say on stderr why it stops (`reason`, if any), what it
    waits for and what it leaves unanswered. Then Ctrl-C and SIGTERM are ignored until the process exits: once the
    writes are done (or given up on) a late signal changes nothing, and must not turn the clean stop into an exit of
    130 or 143."""
    left = 0
    try:  # a second Ctrl-C anywhere in here stops at once (server_close, in the caller, closes the socket)
        if reason:
            print(f"felix serve: {reason}", file=sys.stderr, flush=True)
        n = server.stop_accepting()
        if n:
            print(f"felix serve: waiting up to {grace:g} s for {n} splice write{'s' * (n != 1)} in flight to "
                  "answer (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
            left, why = server.wait_for_writes(grace), f"gave up after {grace:g} s"
    except KeyboardInterrupt:
        left, why = server.writes_in_flight, "stopped at once"
    finally:
        ignore_stop_signals()
    if left:
        print(f"felix serve: {why}: {left} splice write{'s' * (left != 1)} unanswered, each saved whole or not "
              "at all (GET /api/v1/splice/status after a restart says which)", file=sys.stderr, flush=True)
