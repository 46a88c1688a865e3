"""A finished store's array as a memory map: decoded once into an uncompressed ``.npy`` cache, then shared.

Training draws random (image, view) pairs from every part of a store at every step. Read straight from Zarr, each
pair costs the decompression of its whole chunk; read into memory, every rank holds its own copy (reps and int32
tokens of 1.28M images x 4 views: 10.5 GB per GPU). So the array is decoded once, chunk by chunk, into a plain
``.npy`` file beside the store (``<data>/cache/``), and every process maps that file: a batch then costs one small
read per row, memory holds only what the batches touch, and the OS page cache keeps one copy for all the ranks of a
node (the pages are clean and file-backed: no process's heap, split between the processes that map them, and
reclaimable). bench/scale.py measures it at ImageNet size (bench/RESULTS.md, "scale").

The file is named by a hash of what decides its content (the store's recorded identity and chunk-file checksums,
the array's name, shape, dtype and chunking, the dtype asked for), so a rebuilt store never reuses a stale copy; the
copy of an older identity (and a killed build's partial file) is deleted when a new one is made. One process builds
it under a file lock while the others wait; the checks given to :func:`mapped_array` run on every chunk while it is
built, so a copy that exists has passed them. It costs the array's uncompressed size on disk (4.9 GiB of reps and
2.4 GiB of uint16 tokens at ImageNet with 4 views).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from pipeline.core.progress import log

CACHE_DIR = "cache"


def cache_path(store: Path, group: zarr.Group, name: str, dtype: np.dtype) -> Path:
    """Where the decoded copy of ``store``'s array ``name`` as ``dtype`` lives: ``<store's folder>/cache/``."""
    arr = group[name]
    attrs = group.attrs.asdict()
    what = {"identity": attrs.get("identity", {}), "files": attrs.get("chunks", {}), "array": name,
            "shape": list(arr.shape), "stored_dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "dtype": np.dtype(dtype).str}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(store).parent / CACHE_DIR / f"{Path(store).name}.{name}.{digest}.npy"


def mapped_array(store: Path, group: zarr.Group, name: str, dtype: np.dtype,
                 check: Callable[[int, np.ndarray], None] = lambda start, block: None) -> np.ndarray:
    """Array ``name`` of the open store ``group`` (at ``store``) as ``dtype``, memory-mapped from its decoded copy
    (built first when missing; ``check(first_row, block)`` sees every chunk then and raises to refuse the store).
    The map is copy-on-write: writing into it changes only the process's own pages, never the file."""
    target = cache_path(store, group, name, dtype)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f"{Path(store).name}.{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes; a waiting process then finds the copy
            if not target.exists():
                for stale in target.parent.glob(f"{Path(store).name}.{name}.*.npy*"):
                    stale.unlink()  # older identities' copies, and a killed builder's partial file
                _decode(group[name], np.dtype(dtype), target, check)
    return np.load(target, mmap_mode="c")


def _decode(arr: zarr.Array, dtype: np.dtype, target: Path, check: Callable[[int, np.ndarray], None]) -> None:
    log(f"decoding {arr.shape} {arr.dtype} into {target} (once; later runs map it)")
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=arr.shape)
    try:
        step = arr.chunks[0]
        for start in range(0, arr.shape[0], step):
            block = np.asarray(arr[start:start + step])
            check(start, block)
            out[start:start + len(block)] = block
        out.flush()
        del out
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
