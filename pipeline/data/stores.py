"""Chunked Zarr v3 stores (``reps.zarr``, ``tokens.zarr``): resumable, rank-split, identity-checked.

A store is built in ``<name>.partial`` next to its final path. The main array is chunked along N; a
``done`` array (one element per chunk, each its own Zarr chunk) records which chunks are complete, so
ranks write disjoint chunks without coordination and a killed run resumes where it stopped. The store's
``identity`` attribute (model hash and config, views, index hash) decides whether a partial store may be
resumed and whether a later stage may use it; a mismatch is never appended to or silently reused.

When a store is finalised it records every chunk file it wrote (size and CRC-32) in its ``chunks`` attribute;
:func:`open_store` checks that each one is there at its size and, through :class:`CheckedStore`, checks each chunk
it reads, so a deleted chunk never reads as zeros and a damaged one is named (store and chunk) instead of
surfacing as a decompression error or as silently wrong values.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore

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
            group = zarr.open_group(str(self.partial), mode="r")
            old = group.attrs.asdict()
            same = _canonical(old.get("identity", {})) == _canonical(identity) and old.get("chunk_rows") == self.chunk_rows
            if same:
                done = int(self._check_bookkeeping(group).sum())
        except Exception as exc:  # damaged metadata or done record: resuming could only fail the same way each time
            log(f"warning: discarding {self.partial}: its bookkeeping is damaged ({type(exc).__name__}: {exc}); "
                "starting over")
            shutil.rmtree(self.partial)
            return False
        if same:
            log(f"resuming {self.partial}: {done}/{self.num_chunks} chunks already written")
            return True
        log(f"discarding {self.partial}: it was built from other inputs")
        shutil.rmtree(self.partial)
        return False

    def _check_bookkeeping(self, group: zarr.Group) -> np.ndarray:
        """The ``done`` record of a partial store about to be resumed, after checking that it and the arrays it
        describes are readable and of the expected sizes."""
        done = np.asarray(group["done"][:])
        if done.shape != (self.num_chunks,):
            raise ValueError(f"'done' has shape {done.shape}, expected ({self.num_chunks},)")
        if group[self.array].shape[0] != self.n:
            raise ValueError(f"{self.array!r} has {group[self.array].shape[0]} rows, expected {self.n}")
        return done

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
        with chunk_write_errors(self.partial, chunk):
            self.group[self.array][r.start:r.stop] = values
            self.group["done"][chunk] = 1

    def finalize(self, extra_attrs: dict | None = None) -> None:
        missing = int((self.group["done"][:] == 0).sum())
        if missing:
            raise RcgError(f"{self.partial}: {missing} chunks are still missing; rerun to resume")
        self.group.attrs.update({**(extra_attrs or {}), "chunks": chunk_manifest(self.partial), "complete": True})
        replace_dir(self.partial, self.path)


@contextlib.contextmanager
def chunk_write_errors(partial: Path, chunk: int) -> Iterator[None]:
    """Around one chunk's writes: an OSError (a full disk names no file) becomes one line naming the store."""
    try:
        yield
    except OSError as exc:
        raise RcgError(f"cannot write chunk {chunk} of {partial}: {exc.strerror or exc}; free space or fix the "
                       "folder, then rerun to resume") from exc


def chunk_manifest(path: Path) -> dict[str, list[int]]:
    """{key: [size, crc32]} of every chunk file under the store ``path`` (the metadata files excluded)."""
    manifest = {}
    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if name == "zarr.json":
                continue
            file = Path(folder) / name
            data = file.read_bytes()
            manifest[file.relative_to(path).as_posix()] = [len(data), zlib.crc32(data)]
    return manifest


def chunk_damage(path: Path, attrs: dict) -> str | None:
    """What is wrong with the chunk files a finished store recorded (None when all are there at their size);
    a stat per chunk. Stores written before chunks were recorded cannot be checked and pass."""
    for key, (size, _) in attrs.get("chunks", {}).items():
        try:
            found = os.stat(Path(path) / key).st_size
        except FileNotFoundError:
            return f"chunk {key} is missing"
        if found != size:
            return f"chunk {key} is {found} bytes, {size} when it was written"
    return None


class CheckedStore(LocalStore):
    """A read-only local store that checks each chunk it reads against the store's manifest: a missing chunk is
    an error, not fill values, and a damaged one is named."""

    def __init__(self, root: Path, manifest: dict[str, list[int]]):
        super().__init__(root, read_only=True)
        self.manifest = manifest

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        buffer = await super().get(key, prototype, byte_range)
        expected = self.manifest.get(key)
        if expected is None or byte_range is not None:
            return buffer
        if buffer is None:
            raise RcgError(f"{self.root}: chunk {key} is missing; delete the store and rerun the stage that writes it")
        data = buffer.as_numpy_array()  # a view: no copy of the chunk's bytes
        if [data.nbytes, zlib.crc32(data)] != expected:
            raise RcgError(f"{self.root}: chunk {key} is damaged (its checksum differs from when it was written); "
                           "delete the store and rerun the stage that writes it")
        return buffer


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
    damage = chunk_damage(path, attrs)
    if damage:
        raise RcgError(f"{path}: {damage}; the store was damaged after it was written: delete it and rerun the "
                       "stage that writes it")
    if "chunks" in attrs:
        group = zarr.open_group(store=CheckedStore(path, attrs["chunks"]), mode="r")
    return group

