"""The exceptions users see: an error names the problem and the file or field; a stop names the signal."""


import signal


class FelixError(Exception):
    """A user-facing error: the CLI prints it as one line and exits with status 2."""


class RunStopped(KeyboardInterrupt):
    """A verb stopped by a signal after its cleanup ran (a training run checkpointed, answers in flight stored):
    the CLI prints the message and exits with `exit_code`, 128 + the signal. A KeyboardInterrupt, so the cleanup
    that Ctrl-C runs runs for it too."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


def stop_reason(exc: KeyboardInterrupt) -> str:
    """What stopped a verb: a `RunStopped`'s own words, or a bare Ctrl-C's KeyboardInterrupt, which has none."""
    return str(exc) or "stopped by SIGINT"
