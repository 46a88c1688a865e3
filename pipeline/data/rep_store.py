"""The representation store (``reps.zarr``, written by ``encode``) in memory, and the RDM's batches from it.

The official recipe runs the frozen encoder on a fresh random crop of every image at every step; here every
view was encoded once, so a training batch is an index into an in-memory [N, V, D] tensor (a random image,
a random one of its V views) and costs what the gather costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.config import RdmModel
from pipeline.core.errors import RcgError
from pipeline.data.stores import open_store
from pipeline.train.rng import seeded_generator


@dataclass
class RepStore:
    """The whole representation store on one device: reps [N, V, D] float32, labels [N], its identity."""
    path: Path
    reps: torch.Tensor
    labels: torch.Tensor
    identity: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.reps.shape)


def load_store(path: Path, model: RdmModel, device: torch.device) -> RepStore:
    """Read reps.zarr chunk by chunk into memory (ImageNet at V=4 is ~5 GB), refusing NaN/Inf rows and a
    representation size or label set the RDM config ``model`` (``rdm.model``) cannot take."""
    group = open_store(path, "reps")
    arr = group["reps"]
    if arr.ndim != 3:
        raise RcgError(f"{path}: 'reps' has shape {arr.shape}, expected [N, V, D]")
    n, v, dim = arr.shape
    if dim != model.in_channels:
        raise RcgError(f"{path} holds {dim}-d representations but rdm.model.in_channels is {model.in_channels}")
    reps = np.empty((n, v, dim), dtype=np.float32)
    step = arr.chunks[0]
    for start in range(0, n, step):
        block = np.asarray(arr[start:start + step], dtype=np.float32)
        bad = ~np.isfinite(block).all(axis=2)
        if bad.any():
            row, view = (int(i) for i in np.argwhere(bad)[0])
            raise RcgError(f"{path}: row {start + row} (view {view}) holds NaN or Inf; "
                           "rerun encode (delete the store) or check the encoder")
        reps[start:start + step] = block
    labels = np.asarray(group["labels"][:], dtype=np.int64)
    if model.class_cond:
        if (labels < 0).any():
            raise RcgError(f"{path}: rdm.model.class_cond needs labels, but row {int(np.argmax(labels < 0))} "
                           "has none (-1): the images came without class folders")
        if labels.max() >= model.num_classes:
            raise RcgError(f"{path}: label {int(labels.max())} does not fit rdm.model.num_classes "
                           f"({model.num_classes})")
    identity = group.attrs.asdict().get("identity", {})
    return RepStore(path, torch.from_numpy(reps).to(device), torch.from_numpy(labels).to(device), identity)


def store_stats(reps: torch.Tensor, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance over all N x V reps, accumulated in float64 block by block: what the
    RDM's whitening is fitted to and the FD reference the samples are scored against."""
    flat = reps.reshape(-1, reps.shape[-1])
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
    outer = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    for i in range(0, len(flat), block):
        x = flat[i:i + block].double()
        total += x.sum(0)
        outer += x.T @ x
    n = len(flat)
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


class RepBatches:
    """Batch ``step`` of rank ``rank`` as a pure function of (seed, step, rank), so a resumed run draws
    exactly what the killed one would have.

    Every epoch the images go through a fresh seeded permutation split across ranks (DistributedSampler
    with drop_last, as the official loader); each image then gets a uniformly random one of its V views,
    the stand-in for the official random crop + flip. ``batch`` is this rank's share of the global batch.
    """

    def __init__(self, store: RepStore, batch: int, seed: int, d: distributed.Dist):
        self.store, self.batch, self.seed, self.d = store, batch, seed, d
        n = store.shape[0]
        self.per_epoch = n // (batch * d.world)
        if self.per_epoch == 0:
            raise RcgError(f"rdm.train.batch_size ({batch * d.world}: {batch} per rank x {d.world} ranks) exceeds "
                           f"the store's {n} images")
        self.epoch, self.perm = -1, None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """(x0 [B, D], row indices [B], the step's generator for the diffusion noise)."""
        epoch, i = divmod(step, self.per_epoch)
        device = self.store.reps.device
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.store.shape[0], generator=seeded_generator(device, self.seed, 1, epoch),
                                       device=device)
        start = (i * self.d.world + self.d.rank) * self.batch
        rows = self.perm[start:start + self.batch]
        gen = seeded_generator(device, self.seed, 2, step, self.d.rank)
        views = torch.randint(self.store.shape[1], (self.batch,), generator=gen, device=device)
        return self.store.reps[rows, views], rows, gen
