"""Step-indexed batches: what iteration ``it`` trains on is a pure function of (seed, it, rank), so a run resumed at
any step sees the batches the uninterrupted one saw, with any worker count and (for the data the chain orders)
on any world size.

One mechanism under all three batchers: :class:`EpochChain`, global positions 0, 1, 2, ... over an endless chain of
seeded epoch permutations; iteration ``it`` of a global batch B takes positions [it*B, (it+1)*B) and rank ``r`` its
r-th slice. :class:`StepBatches` (a DataLoader's batch sampler over the shards), ``RepBatches``
(:mod:`pipeline.data.rep_store`) and ``PixelBatches`` (:mod:`pipeline.data.pixel_data`) each name the stream of their
permutations and add their own per-step draws (views, noise, masks).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler

from pipeline.core.errors import RcgError
from pipeline.core.rng import seeded_numpy


class EpochChain:
    """Positions k = 0, 1, ... over epochs e = 0, 1, ...: epoch e is ``permutation(e)`` (a tensor or array of
    item indices), of which the first ``epoch_len`` entries are used (a shorter ``epoch_len`` than the permutation
    drops each epoch's tail, as DistributedSampler's drop_last). The last epoch's permutation is kept, so walking
    forward draws each one once."""

    def __init__(self, permutation: Callable[[int], Any], epoch_len: int):
        self.permutation, self.epoch_len = permutation, epoch_len
        self.epoch, self.perm = -1, None

    def _epoch(self, epoch: int) -> Any:
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, self.permutation(epoch)
        return self.perm

    def rows(self, first: int, count: int) -> torch.Tensor:
        """The items at positions [first, first + count), across epoch boundaries (int64)."""
        out = []
        while count:
            epoch, offset = divmod(first, self.epoch_len)
            take = min(count, self.epoch_len - offset)
            out.append(torch.as_tensor(self._epoch(epoch)[offset:offset + take]))
            first, count = first + take, count - take
        return torch.cat(out) if len(out) > 1 else out[0]


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Iteration ``it`` takes positions [it*B, (it+1)*B) of an endless chain of seeded epoch permutations
    (B = ``batch_size``, the GLOBAL batch) and rank ``r`` its r-th slice of B / world. Items are ``(idx, k)``:
    the dataset index and the global position k, from which a dataset seeds the item's own randomness
    (crops, augmentations) so that it too is a function of the step alone."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1,
                 key: str = "batch_size"):
        if batch_size % world:
            raise RcgError(f"{key} ({batch_size}) must be divisible by the {world} ranks")
        if batch_size > n:
            raise RcgError(f"{key} ({batch_size}) exceeds the {n} training images")
        self.n, self.batch, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.per, self.rank = batch_size // world, rank

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        chain = EpochChain(lambda epoch: seeded_numpy(self.seed, "batches.permutation", epoch).permutation(self.n),
                           self.n)
        for it in range(self.start, self.stop):
            first = it * self.batch + self.rank * self.per
            yield [(int(idx), k) for k, idx in enumerate(chain.rows(first, self.per).tolist(), start=first)]
