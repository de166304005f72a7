"""Signal handlers set for a while and then put back. Python lets only the main thread set them: elsewhere
nothing is set and the signals keep their action. Imports no torch (the CLI's commands use it)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from felix.errors import RunStopped

# Stop signals the process started with ignored (SIG_IGN), as a non-interactive shell starts a script's background
# jobs (`felix train ... &`) so that a Ctrl-C meant for the script spares them. Python keeps such a signal ignored,
# and so does felix: taking it over once a run had started made a SIGINT in its first seconds do nothing and a later
# one stop it.
IGNORED_AT_START = frozenset(s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.SIG_IGN)


def set_handlers(signals: tuple[int, ...], handler: Callable[[int, Any], None] | signal.Handlers) -> dict[int, Any]:
    """`handler` for each of `signals` but those ignored since the process started (`IGNORED_AT_START`), from the
    main thread (elsewhere none); the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signals if s not in IGNORED_AT_START}


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


class HeldStops:
    """Inside the `with` block (entered from the main thread), Ctrl-C and SIGTERM run their handlers as before,
    except inside `hold()`: there they wait and run as the outermost hold ends. For statements a stop must not
    cut apart, such as sending a paid request and noting that it is on its way. Handlers are swapped only on
    entering and leaving the block, not per hold, so no hold can end with a handler left half put back; and a
    gate that outlives the block (a stop while it was being set) only forwards. Off the main thread nothing is
    set: signals interrupt only the main thread anyway."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                 on_held: Callable[[], None] | None = None):
        self.signals = signals
        self.on_held = on_held  # run at once for a stop a hold delays (it must be safe anywhere: set an Event)
        self.previous: dict[int, Any] = {}
        self.depth = 0
        self.caught: list[int] = []

    def _gate(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.caught.append(signum)
            if self.on_held is not None:
                self.on_held()
        else:
            self.previous[signum](signum, frame)

    def __enter__(self) -> HeldStops:
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            for s in self.signals:
                handler = signal.getsignal(s)
                if callable(handler):  # SIG_DFL ends the process, SIG_IGN ignores: nothing to hold
                    self.previous[s] = handler
                    signal.signal(s, self._gate)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._restore()
        if exc_type is None:
            self._deliver()

    def _restore(self) -> None:
        restore_handlers({s: h for s, h in self.previous.items() if signal.getsignal(s) == self._gate})

    def _deliver(self) -> None:
        while self.caught:
            s = self.caught.pop(0)
            self.previous[s](s, None)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """A stop signal that comes while the block runs takes effect when it ends (when it ends normally: an
        error leaving it stops the run anyway)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth:
            self._deliver()
