"""The one exception type users see: a clear, single-line account of what is wrong with their input."""

from __future__ import annotations

from pathlib import Path


class RcgError(Exception):
    """Bad input or configuration; the CLI prints the message alone (no traceback unless --debug)."""


def require_file(path: Path | str | None, key: str) -> None:
    """A stage checks the files it reads, before any work (not the schema: a stage must run while files it never
    reads are still downloading). ``None`` means the option is off."""
    if path is not None and not Path(path).is_file():
        raise RcgError(f"{key}: file does not exist: {path}")


def require_dir(path: Path | str | None, key: str) -> None:
    """:func:`require_file` for a folder."""
    if path is not None and not Path(path).is_dir():
        raise RcgError(f"{key}: folder does not exist: {path}")
