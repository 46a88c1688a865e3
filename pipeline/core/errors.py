"""The one exception type users see: a clear, single-line account of what is wrong with their input."""


class RcgError(Exception):
    """Bad input or configuration; the CLI prints the message alone (no traceback unless --debug)."""
