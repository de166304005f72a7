"""Signal handlers set for a while and then put back. Python lets only the main thread set them: elsewhere
nothing is set and the signals keep their action. Imports no torch (the CLI's commands use it)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from felix.errors import RunStopped


def set_handlers(signals: tuple[int, ...], handler: Callable[[int, Any], None] | signal.Handlers) -> dict[int, Any]:
    """`handler` for each of `signals`, from the main thread (elsewhere none); the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signals}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back what `set_handlers` replaced."""
    for s, handler in previous.items():
        # None: a handler set outside Python, which cannot be put back; the default is the nearest
        signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM (systemd stop, a scheduler, `kill`, `timeout`) raises `RunStopped`, a
    KeyboardInterrupt, as Ctrl-C does, instead of killing the process before its cleanup. Only the first: a repeated
    SIGTERM (systemd's control-group stop and a forwarding parent such as torchrun both send one) must not cut the
    cleanup short; a second Ctrl-C still does."""
    raised = False

    def terminate(signum: int, frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise RunStopped("stopped by SIGTERM", signal.SIGTERM)

    previous = set_handlers((signal.SIGTERM,), terminate)
    try:
        yield
    finally:
        # a handler the block set in its place stays (`ignore_stop_signals`: the verb is done, the process ending)
        restore_handlers({s: h for s, h in previous.items() if signal.getsignal(s) is terminate})


def ignore_stop_signals() -> None:
    """Ctrl-C and SIGTERM do nothing from now until the process exits (set from the main thread only): for a verb
    whose work is done and whose exit status is settled, which a late signal must not turn into a failure.
    Python's exit keeps an ignored signal ignored, and so does the end of `sigterm_interrupts`."""
    while True:
        try:
            set_handlers((signal.SIGINT, signal.SIGTERM), signal.SIG_IGN)
            return
        except KeyboardInterrupt:  # one pending as they were set (signal.signal runs it first): it changes nothing
            continue
