"""The pixel generator's training data: ``tokens.zarr`` paired with ``reps.zarr``, memory-mapped, and its batches.

The official recipe runs the VQGAN and the MoCo v3 encoder on a fresh crop of every image at every step; here
every view was tokenized and encoded once, so a step is an index into two aligned host arrays: image ``i``,
one of its V views ``v``, ``tokens[i, v]`` with ``reps[i, v]`` (the same pixels, checked by
:func:`pipeline.data.alignment.check_aligned`). Both are mapped from decoded copies of the stores
(:mod:`pipeline.data.mapped`), tokens as the stores' uint16: per process, memory holds what the batches touch, one
copy per node in the page cache, and only a batch's rows go to the training device. The labels and the row
split live on the training device (8 bytes an image each).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.data.alignment import check_aligned
from pipeline.data.batches import EpochChain
from pipeline.data.clusters import kmeans
from pipeline.data.mapped import mapped_array
from pipeline.data.rep_store import finite_reps
from pipeline.data.stores import open_store
from pipeline.core.rng import seeded_generator



@dataclass
class PixelData:
    """tokens [N, V, L] uint16 (row-major grid) and reps [N, V, D] float32 in host memory (memory-mapped); on the
    training device: labels [N] (store labels, or k-means ids for ``cluster``; -1 where there are none) and the
    train / held-out row split; and what the stores record."""
    tokens: torch.Tensor
    reps: torch.Tensor
    labels: torch.Tensor
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    grid: list[int]
    codebook_size: int
    identity: dict
    centroids: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        """The training device (where the labels live)."""
        return self.labels.device

    def tokens_at(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """tokens[rows, views] [B, L] as int64 on the training device, gathered on the host."""
        return self.tokens[rows.cpu(), views.cpu()].to(self.device).long()

    def reps_at(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """reps[rows, views] [B, D] on the training device, gathered on the host."""
        return self.reps[rows.cpu(), views.cpu()].to(self.device)

    @property
    def num_labels(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def label_counts(self) -> list[int]:
        """How many training images carry each label (what a sampler draws labels by)."""
        return torch.bincount(self.labels[self.train_rows], minlength=self.num_labels).tolist()


def codes_within(path: Path, codebook: int) -> Callable[[int, np.ndarray], None]:
    """A chunk check for :func:`pipeline.data.mapped.mapped_array`: refuse token ids outside the codebook."""
    def check(start: int, block: np.ndarray) -> None:
        if block.max(initial=0) >= codebook:
            raise RcgError(f"{path} holds token id {int(block.max())} outside its {codebook}-code codebook")
    return check


def load_pixel_data(tokens_path: Path, reps_path: Path, conditioning: str, holdout: int, seed: int,
                    device: torch.device, clusters: int = 0, kmeans_iters: int = 50) -> PixelData:
    """Both stores mapped (labels and row split on ``device``) after refusing a misaligned pair, NaN reps, token
    ids outside the recorded codebook (both checked once, when the decoded copies are made), and labels the
    conditioning cannot use. ``holdout`` images (a seeded choice) are kept out of
    training for the validation figures; ``clusters`` > 0 labels every image by k-means of its view-0 rep."""
    n, v = check_aligned(tokens_path, reps_path)
    tokens_group, reps_group = open_store(tokens_path, "tokens"), open_store(reps_path, "reps")
    t_id, r_id = tokens_group.attrs.asdict()["identity"], reps_group.attrs.asdict()["identity"]
    codebook, grid = int(t_id["codebook_size"]), list(t_id["grid"])
    if codebook > 2 ** 16:
        raise RcgError(f"{tokens_path}: a {codebook}-code codebook does not fit the uint16 tokens")
    tokens = mapped_array(tokens_path, tokens_group, "tokens", np.uint16,
                          codes_within(tokens_path, codebook)).reshape(n, v, -1)
    reps = mapped_array(reps_path, reps_group, "reps", np.float32, finite_reps(reps_path))
    labels = torch.from_numpy(np.asarray(reps_group["labels"][:], dtype=np.int64))
    if holdout >= n:
        raise RcgError(f"pixel.eval.num_images ({holdout}) leaves none of the stores' {n} images to train on")
    order = torch.randperm(n, generator=seeded_generator("cpu", seed, "pixel.holdout"))
    val_rows, train_rows = order[:holdout].sort().values, order[holdout:].sort().values
    reps_t = torch.from_numpy(reps)
    centroids = None
    if conditioning == "cluster":
        centroids, labels = kmeans(reps_t[:, 0].to(device), clusters, seeded_generator(device, seed, "pixel.kmeans"),
                                   iters=kmeans_iters)
        labels, centroids = labels.cpu(), centroids.cpu()
    elif conditioning == "class" and (labels < 0).any():
        row = int(torch.argmax((labels < 0).int()))
        raise RcgError(f"{reps_path}: the class conditioning needs labels, but row {row} "
                       "has none (-1): the images came without class folders (use cluster)")
    return PixelData(torch.from_numpy(tokens), reps_t, labels.to(device), train_rows.to(device),
                     val_rows.to(device), grid, codebook, {"tokens": t_id, "reps": r_id}, centroids)


class PixelBatches:
    """Iteration ``it`` as a pure function of (seed, it, rank), so a resumed run draws what the killed one would
    have: a chain of seeded epoch permutations of the training images cut into global batches, this rank's slice
    of it in ``accum`` micro-batches, each image with a uniformly random one of its V views, and one generator
    per micro-batch for the step's masks and rep drops."""

    def __init__(self, data: PixelData, batch_size: int, accum: int, seed: int, d: Dist):
        n = len(data.train_rows)
        if batch_size % (d.world * accum):
            raise RcgError(f"pixel.train.batch_size ({batch_size}) must be divisible by {d.world} ranks x "
                           f"{accum} accumulation steps")
        if batch_size > n:
            raise RcgError(f"pixel.train.batch_size ({batch_size}) exceeds the {n} training images")
        self.data, self.batch, self.accum, self.seed, self.d = data, batch_size, accum, seed, d
        self.micro = batch_size // d.world // accum
        self.chain = EpochChain(lambda epoch: torch.randperm(
            n, generator=seeded_generator("cpu", seed, "pixel.permutation", epoch)), n)

    def _rows(self, first: int, count: int) -> torch.Tensor:
        return self.data.train_rows[self.chain.rows(first, count).to(self.data.train_rows.device)]

    def __call__(self, it: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Generator]]:
        """``accum`` micro-batches of (rows [b], views [b], generator)."""
        device = self.data.device
        out = []
        for j in range(self.accum):
            first = it * self.batch + (self.d.rank * self.accum + j) * self.micro
            gen = seeded_generator(device, self.seed, "pixel.step", it, self.d.rank, j)
            views = torch.randint(self.data.tokens.shape[1], (self.micro,), generator=gen, device=device)
            out.append((self._rows(first, self.micro), views, gen))
        return out
