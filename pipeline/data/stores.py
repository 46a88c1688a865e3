"""Chunked Zarr v3 stores (``reps.zarr``, ``tokens.zarr``): resumable, rank-split, identity-checked.

A store is built in ``<name>.partial`` next to its final path. The main array is chunked along N; a
``done`` array (one element per chunk, each its own Zarr chunk) records which chunks are complete, so
ranks write disjoint chunks without coordination and a killed run resumes where it stopped. The store's
``identity`` attribute (model hash and config, views, index hash) decides whether a partial store may be
resumed and whether a later stage may use it; a mismatch is never appended to or silently reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.artifacts import replace_dir
from pipeline.core.errors import RcgError
from pipeline.core.progress import log

FORMAT_VERSION = 1


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class StoreWriter:
    """Writes ``array`` [N, ...] chunk by chunk into ``<path>.partial``; :meth:`finalize` moves it into place."""

    def __init__(self, path: Path, array: str, shape: tuple[int, ...], dtype: str, chunk_rows: int,
                 identity: dict, labels: np.ndarray, rank: int = 0, barrier=lambda: None):
        self.path, self.array, self.chunk_rows = Path(path), array, chunk_rows
        self.partial = partial_path(self.path)
        self.n = shape[0]
        self.num_chunks = -(-self.n // chunk_rows)
        if rank == 0:
            self._prepare(shape, dtype, identity, labels)
        barrier()
        self.group = zarr.open_group(str(self.partial), mode="r+")

    def resumes(self, identity: dict) -> bool:
        """True when ``<path>.partial`` was started from the same inputs (then it is resumed); otherwise any
        partial store is discarded and the caller creates a fresh one."""
        if not self.partial.exists():
            return False
        try:
            old = zarr.open_group(str(self.partial), mode="r").attrs.asdict()
        except Exception:
            old = {}
        if _canonical(old.get("identity", {})) == _canonical(identity) and old.get("chunk_rows") == self.chunk_rows:
            done = int(zarr.open_array(str(self.partial / "done"), mode="r")[:].sum())
            log(f"resuming {self.partial}: {done}/{self.num_chunks} chunks already written")
            return True
        log(f"discarding {self.partial}: it was built from other inputs")
        shutil.rmtree(self.partial)
        return False

    def _prepare(self, shape, dtype, identity, labels) -> None:
        if self.resumes(identity):
            return
        group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        group.create_array(self.array, shape=shape, chunks=(self.chunk_rows, *shape[1:]), dtype=dtype,
                           fill_value=0)
        group.create_array("labels", shape=(self.n,), chunks=(max(self.n, 1),), dtype="int64", fill_value=-1)
        group["labels"][:] = labels
        group.create_array("done", shape=(self.num_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update({"format_version": FORMAT_VERSION, "array": self.array, "identity": identity,
                            "chunk_rows": self.chunk_rows, "complete": False})

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's contiguous block of chunk ids that are not yet done."""
        per = -(-self.num_chunks // world)
        done = self.group["done"][:]
        return [c for c in range(rank * per, min((rank + 1) * per, self.num_chunks)) if not done[c]]

    def rows(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n))

    def write(self, chunk: int, values: np.ndarray) -> None:
        """Write one whole chunk, then mark it done (so a kill mid-write just redoes the chunk)."""
        r = self.rows(chunk)
        self.group[self.array][r.start:r.stop] = values
        self.group["done"][chunk] = 1

    def finalize(self, extra_attrs: dict | None = None) -> None:
        missing = int((self.group["done"][:] == 0).sum())
        if missing:
            raise RcgError(f"{self.partial}: {missing} chunks are still missing; rerun to resume")
        self.group.attrs.update({**(extra_attrs or {}), "complete": True})
        replace_dir(self.partial, self.path)


def open_store(path: Path, array: str) -> zarr.Group:
    """Open a finished store for reading, with a clear error when it is missing or incomplete."""
    path = Path(path)
    if not path.exists():
        raise RcgError(f"store not found: {path}")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise RcgError(f"{path} is not a Zarr store: {exc}") from exc
    attrs = group.attrs.asdict()
    if attrs.get("array") != array or array not in group:
        raise RcgError(f"{path} does not hold a {array!r} array")
    if not attrs.get("complete"):
        raise RcgError(f"{path} is incomplete; rerun the stage that writes it")
    return group


def check_identity(group: zarr.Group, expected: dict, path: Path) -> None:
    """Refuse a store whose recorded identity differs from what the caller expects, naming the fields."""
    have = group.attrs.asdict().get("identity", {})
    diffs = [k for k in expected if _canonical({"v": have.get(k)}) != _canonical({"v": expected[k]})]
    if diffs:
        details = "; ".join(f"{k}: store has {have.get(k)!r}, expected {expected[k]!r}" for k in diffs[:3])
        raise RcgError(f"{path} was built from other inputs ({', '.join(diffs)}): {details}")
