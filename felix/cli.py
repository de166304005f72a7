"""The `felix` command: one verb per pipeline stage, each defined in `felix.commands.<verb>`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from felix import __version__
from felix.cpus import cap_omp_threads, limit_omp_spinning
from felix.errors import FelixError, stop_reason
from felix.metrics import json_safe
from felix.signal_handlers import sigterm_interrupts

# The verbs, in pipeline order, with the one line `felix --help` shows for each. `felix.commands.<verb>`
# defines `register(subparsers, help)`, which adds the verb's parser and sets `func=handler(args) -> int`.
# Only the verb being run is imported: several import torch, which `felix --help` has no need of.
VERBS = {
    "demo": "the whole recipe at toy scale (CPU, a few minutes)",
    "data": "corpus, shards and data-mix tools",
    "tokenizer": "train or inspect the tokenizer",
    "train": "train a model",
    "generate": "sample text from a checkpoint (KV-cached)",
    "quantize": "pack weights into rq4/rq3/nf4/q8_0/q4_0 and report sizes",
    "quant": "quantization reports (survival)",
    "export": "export a checkpoint for deployment (GGUF for llama.cpp, HF transformers)",
    "splice": "live edits of SpliceCore tensors (diagnose, apply, rollback, list, bench, make-edits)",
    "serve": "serve a checkpoint: splice API + OpenAI-compatible chat",
    "validate": "faithfulness gate over task outputs (L1 schema, L2 fidelity, L3 dataset health)",
    "harvest": "ask teacher models the task suite into a resumable store (run, status, export, diff)",
    "synth": "FinePhrase: rephrase documents into table/math/faq/tutorial text, then mix",
    "info": "parameters, FLOPs/token, training memory, tokens and checkpoint disk of a config",
    "plan": "compute envelope: memory, throughput, days to 20/100 tokens per param",
    "bench": "measure training throughput, MFU and memory",
}


def print_json(obj: Any) -> None:
    """Print one JSON object, alone on stdout (the `--json` contract); non-finite numbers as null."""
    sys.stdout.write(json.dumps(json_safe(obj), sort_keys=True, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def plain_warnings(verb: str) -> Iterator[None]:
    """Python warnings as one line on stderr, `felix VERB: warning: MESSAGE`, instead of a source path and
    the echoed source line; the filters (and so their once-per-place dedup) stay as they were."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        with contextlib.suppress(OSError):  # stderr gone (a closed pipe): lost, as with warnings' own showwarning
            print(f"felix {verb}: warning: {kind}{message}", file=file if file is not None else sys.stderr)

    with warnings.catch_warnings():  # restores showwarning and the filters on the way out
        warnings.showwarning = show
        yield


class VerbParser(argparse.ArgumentParser):
    """An argparse parser that refuses the arguments it does not know itself, with its own usage.

    Plain argparse hands a sub-parser's unknown arguments up to the top level, which reports them under
    `usage: felix [-h] [--version] <verb> ...`; the parser of the verb (or sub-verb) that was given them is
    the one whose usage says what it takes. Sub-parsers are made of their parent's class, so every level is one.

    Each level names itself in the parsed arguments (`felix_verb`, e.g. "quant survival"), the innermost one
    winning, so errors and warnings name the sub-verb they come from.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(felix_verb=self.prog.removeprefix("felix").strip())

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `felix` parser with `verb`'s full sub-parser; every other verb gets only its help line."""
    parser = VerbParser(prog="felix", description=__doc__)
    parser.add_argument("--version", action="version", version=f"felix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<verb>")
    for name, help_line in VERBS.items():
        if name == verb:
            importlib.import_module(f"felix.commands.{name}").register(sub, help_line)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on the write end). Where poll is
    missing (Windows) it cannot tell, and says yes: the quiet exit is what a closed stdout pipe wants."""
    if sys.stdout is None:
        return False
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # pytest's capture, a StringIO: no descriptor of its own
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _world_size() -> int:
    """torchrun's WORLD_SIZE (1 without it, or when unreadable); read here, not through felix.distributed, which
    imports torch before `cap_omp_threads` has run."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The verb is the first word that is not an option (the top level's options take no values).
    verb = next((a for a in argv if not a.startswith("-")), None)
    cap_omp_threads()  # before a verb imports torch, which sizes its CPU pool once, at load
    limit_omp_spinning()  # likewise: libgomp reads its spin count once
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        # SIGTERM (systemd stop, a scheduler, `kill`, `timeout`) takes Ctrl-C's path in every verb: cleanup runs
        # (temp files removed, a training run checkpointed, answers in flight stored) and the exit status is 143
        with sigterm_interrupts(), plain_warnings(args.felix_verb):
            rc = int(args.func(args) or 0)
            if sys.stdout is not None:  # None: started with stdout closed (`>&-`), and print() wrote nothing
                sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
            return rc
    except BrokenPipeError:
        # `felix ... | head`: the reader has what it wanted. Quiet, with the status a shell gives SIGPIPE; stdout
        # goes to /dev/null so the interpreter's own flush at exit does not raise again. A pipe or socket of the
        # verb's own that broke is a failure like any other.
        if not _stdout_reader_gone():
            raise
        if sys.stdout is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 141
    except FelixError as exc:
        # under torchrun, which of many processes failed (its summary blames whichever it saw exit first)
        rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ and _world_size() > 1 else ""
        print(f"felix {args.felix_verb}: error: {rank}{exc}", file=sys.stderr)
        return 2
    # RunStopped (felix.errors: stopped by a signal, its cleanup done) carries its exit code
    except KeyboardInterrupt as exc:
        print(f"felix {args.felix_verb}: {stop_reason(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
