"""Sample stores ``data/samples/<setting>.zarr``: what the sample stage writes and the score stage reads.

The contract (a Zarr v3 group):
- ``images`` uint8 [M, H, W, 3], chunked along M;
- ``reps`` float32 [M, D]: the representations a rep generator was conditioned on (RDM samples or stored reps);
- ``labels`` int64 [M]: the class / cluster ids a label generator or a class-conditional RDM was given;
  an unconditional setting has neither, class-conditional RCG has both;
- attrs ``setting`` (its name), ``settings`` (its params), ``models`` ({role: sha256 of the model file}),
  ``seeds``, ``identity`` (what decides whether a partial store is resumed) and ``complete``.

Built like every store here (:class:`pipeline.data.stores.StoreWriter`): in ``<name>.partial`` chunk by chunk,
a ``done`` record per chunk (resume, disjoint rank ranges), renamed into place when every chunk is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.errors import RcgError
from pipeline.data.stores import FORMAT_VERSION, StoreWriter, chunk_write_errors, open_store

ARRAY = "images"


class SampleWriter(StoreWriter):
    """Writes images (+ their reps and/or labels) chunk by chunk into ``<path>.partial``."""

    def __init__(self, path: Path, num: int, image_shape: tuple[int, int, int], chunk_rows: int, identity: dict,
                 attrs: dict, rep_dim: int | None, with_labels: bool, rank: int = 0, barrier=lambda: None):
        self.path, self.array, self.chunk_rows = Path(path), ARRAY, chunk_rows
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.n = num
        self.num_chunks = -(-num // chunk_rows)
        self.rep_dim, self.with_labels = rep_dim, with_labels
        if rank == 0:
            self._prepare_samples(image_shape, identity, attrs)
        barrier()
        self.group = zarr.open_group(str(self.partial), mode="r+")

    def _prepare_samples(self, image_shape: tuple[int, int, int], identity: dict, attrs: dict) -> None:
        if self.resumes(identity):
            return
        group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        rows = self.chunk_rows
        group.create_array(ARRAY, shape=(self.n, *image_shape), chunks=(rows, *image_shape), dtype="uint8",
                           fill_value=0)
        if self.rep_dim is not None:
            group.create_array("reps", shape=(self.n, self.rep_dim), chunks=(rows, self.rep_dim), dtype="float32",
                               fill_value=0)
        if self.with_labels:
            group.create_array("labels", shape=(self.n,), chunks=(rows,), dtype="int64", fill_value=-1)
        group.create_array("done", shape=(self.num_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update({**attrs, "format_version": FORMAT_VERSION, "array": ARRAY, "identity": identity,
                            "chunk_rows": rows, "complete": False})

    def write(self, chunk: int, images: np.ndarray, reps: np.ndarray | None = None,
              labels: np.ndarray | None = None) -> None:
        """Write one whole chunk (images and what they were conditioned on), then mark it done."""
        r = self.rows(chunk)
        if images.shape[0] != len(r) or images.dtype != np.uint8:
            raise RcgError(f"chunk {chunk}: expected {len(r)} uint8 images, got {images.shape[0]} {images.dtype}")
        if (reps is None) != (self.rep_dim is None) or (labels is None) == self.with_labels:
            raise RcgError(f"chunk {chunk}: the conditioning does not match the store's arrays")
        with chunk_write_errors(self.partial, chunk):
            self.group[ARRAY][r.start:r.stop] = images
            if reps is not None:
                self.group["reps"][r.start:r.stop] = reps.astype(np.float32)
            if labels is not None:
                self.group["labels"][r.start:r.stop] = labels.astype(np.int64)
            self.group["done"][chunk] = 1


@dataclass
class Samples:
    """A finished sample store, read lazily: ``images[i]`` etc. are Zarr arrays."""
    path: Path
    images: zarr.Array
    reps: zarr.Array | None
    labels: zarr.Array | None
    attrs: dict

    def __len__(self) -> int:
        return self.images.shape[0]


def open_samples(path: str | Path) -> Samples:
    """A complete sample store (RcgError when missing, incomplete or not a sample store)."""
    group = open_store(Path(path), ARRAY)
    images = group[ARRAY]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise RcgError(f"{path}: 'images' is {images.dtype} {images.shape}, expected uint8 [M, H, W, 3]")
    return Samples(Path(path), images, group["reps"] if "reps" in group else None,
                   group["labels"] if "labels" in group else None, group.attrs.asdict())
