"""The representation store (``reps.zarr``, written by ``encode``) memory-mapped, and the RDM's batches from it.

The official recipe runs the frozen encoder on a fresh random crop of every image at every step; here every
view was encoded once, so a training batch is an index into the [N, V, D] reps (a random image, a random one of its
V views) and costs what the gather costs. The reps stay in host memory, mapped from a decoded copy of the store
(:mod:`pipeline.data.mapped`: one copy per node in the page cache, whatever the rank count); only a batch's rows
go to the training device. The labels and the epoch permutations live on the training device (8 bytes an image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.config import RdmModel
from pipeline.core.errors import RcgError
from pipeline.data.batches import EpochChain
from pipeline.data.mapped import mapped_array
from pipeline.data.stores import open_store
from pipeline.core.rng import seeded_generator


@dataclass
class RepStore:
    """A representation store: reps [N, V, D] float32 in host memory (memory-mapped), labels [N] on the training
    device, its identity."""
    path: Path
    reps: torch.Tensor
    labels: torch.Tensor
    identity: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.reps.shape)

    @property
    def device(self) -> torch.device:
        """The training device (where the labels live)."""
        return self.labels.device

    def gather(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """reps[rows, views] [B, D] on the training device, gathered on the host (indices from any device)."""
        return self.reps[rows.cpu(), views.cpu()].to(self.device)


def finite_reps(path: Path) -> Callable[[int, np.ndarray], None]:
    """A chunk check for :func:`pipeline.data.mapped.mapped_array`: refuse NaN/Inf reps, naming the first row."""
    def check(start: int, block: np.ndarray) -> None:
        bad = ~np.isfinite(block).all(axis=2)
        if bad.any():
            row, view = (int(i) for i in np.argwhere(bad)[0])
            raise RcgError(f"{path}: row {start + row} (view {view}) holds NaN or Inf; "
                           "rerun encode (delete the store) or check the encoder")
    return check


def load_store(path: Path, model: RdmModel, device: torch.device) -> RepStore:
    """Map reps.zarr (decoded once into ``<data>/cache/``; ImageNet at V=4 is ~5 GB), refusing NaN/Inf rows and a
    representation size or label set the RDM config ``model`` (``rdm.model``) cannot take."""
    group = open_store(path, "reps")
    arr = group["reps"]
    if arr.ndim != 3:
        raise RcgError(f"{path}: 'reps' has shape {arr.shape}, expected [N, V, D]")
    n, v, dim = arr.shape
    if dim != model.in_channels:
        raise RcgError(f"{path} holds {dim}-d representations but rdm.model.in_channels is {model.in_channels}")
    reps = mapped_array(path, group, "reps", np.float32, finite_reps(path))
    labels = np.asarray(group["labels"][:], dtype=np.int64)
    if model.class_cond:
        if (labels < 0).any():
            raise RcgError(f"{path}: rdm.model.class_cond needs labels, but row {int(np.argmax(labels < 0))} "
                           "has none (-1): the images came without class folders")
        if labels.max() >= model.num_classes:
            raise RcgError(f"{path}: label {int(labels.max())} does not fit rdm.model.num_classes "
                           f"({model.num_classes})")
    identity = group.attrs.asdict().get("identity", {})
    return RepStore(path, torch.from_numpy(reps), torch.from_numpy(labels).to(device), identity)


def store_stats(reps: torch.Tensor, block: int = 65536,
                device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance over all N x V reps, accumulated in float64 block by block on ``device``
    (default: where ``reps`` are; host-mapped reps go to the training device a block at a time): what the RDM's
    whitening is fitted to and the FD reference the samples are scored against."""
    device = reps.device if device is None else device
    flat = reps.reshape(-1, reps.shape[-1])
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=device)
    outer = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=device)
    for i in range(0, len(flat), block):
        x = flat[i:i + block].to(device).double()
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
        device = store.device
        self.chain = EpochChain(lambda epoch: torch.randperm(
            n, generator=seeded_generator(device, seed, "rdm.permutation", epoch), device=device),
            self.per_epoch * batch * d.world)  # whole global batches per epoch, the tail dropped

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """(x0 [B, D], row indices [B], the step's generator for the diffusion noise)."""
        device = self.store.device
        rows = self.chain.rows(step * self.batch * self.d.world + self.d.rank * self.batch, self.batch)
        gen = seeded_generator(device, self.seed, "rdm.step", step, self.d.rank)
        views = torch.randint(self.store.shape[1], (self.batch,), generator=gen, device=device)
        return self.store.gather(rows, views), rows, gen
