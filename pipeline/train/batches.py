"""Step-indexed batches over a dataset of N items: what iteration ``it`` trains on is a pure function of
(seed, it, rank), so a run resumed at any step sees the batches the uninterrupted one saw, with any worker count."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler

from pipeline.core.errors import RcgError
from pipeline.core.rng import seeded_numpy


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
        epoch, perm = -1, None
        for it in range(self.start, self.stop):
            first = it * self.batch + self.rank * self.per
            items = []
            for k in range(first, first + self.per):
                if k // self.n != epoch:
                    epoch = k // self.n
                    perm = seeded_numpy(self.seed, "batches.permutation", epoch).permutation(self.n)
                items.append((int(perm[k % self.n]), k))
            yield items
