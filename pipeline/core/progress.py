"""Progress bars with rate and ETA on long work, on the main process only, off with RCG_PROGRESS=0."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("RCG_PROGRESS", "1") != "0" and int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             unit: str = "it") -> tqdm:
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True,
                mininterval=0.5, smoothing=0.05)


def log(message: str) -> None:
    """A line for the user (stderr, so stdout stays machine-readable), main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(message, file=sys.stderr)
