"""The one exception type users see: it names the problem and the file or field."""


class FelixError(Exception):
    """A user-facing error: the CLI prints it as one line and exits with status 2."""
