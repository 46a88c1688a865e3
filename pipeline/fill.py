"""The loop behind ``encode`` and ``tokenize``: every view of every image through a model, once, into a store.

Batches never cross a chunk boundary, so what a chunk holds depends only on its rows and the batch size:
the same bytes whether the run was resumed, split across ranks, or done in one go.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.distributed import Dist
from pipeline.progress import progress
from pipeline.shards import ShardSet
from pipeline.stores import StoreWriter
from pipeline.views import ViewRecipe, all_views


class ViewsDataset(Dataset):
    """Image ``idx`` of a shard split as all its views: uint8 [V, crop, crop, 3]."""

    def __init__(self, shards: ShardSet, recipe: ViewRecipe):
        self.shards, self.recipe = shards, recipe

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, idx: int) -> torch.Tensor:
        return torch.from_numpy(all_views(self.shards.read(idx), self.shards.keys[idx], self.recipe))


class ChunkBatches(Sampler[list[int]]):
    """Batches of row indices, cut at every chunk boundary."""

    def __init__(self, writer: StoreWriter, chunks: list[int], batch_size: int):
        self.batches = [list(r[i:i + batch_size]) for c in chunks for r in [writer.rows(c)]
                        for i in range(0, len(r), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def fill_store(writer: StoreWriter, dataset: ViewsDataset, fn: Callable[[torch.Tensor], np.ndarray],
               batch_size: int, workers: int, d: Dist, desc: str) -> int:
    """Run ``fn`` (uint8 [B, V, H, W, 3] -> array [B, V, ...]) over this rank's pending chunks.

    Returns the number of images processed. Each finished chunk is written (and marked done) at once.
    """
    chunks = writer.pending(d.rank, d.world)
    sampler = ChunkBatches(writer, chunks, batch_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    todo = {c: len(writer.rows(c)) for c in chunks}
    parts: dict[int, list[np.ndarray]] = {c: [] for c in chunks}
    done_images = 0
    bar = progress(total=sum(todo.values()), desc=desc, unit="img")
    for batch_rows, views in zip(sampler, loader):
        chunk = batch_rows[0] // writer.chunk_rows
        parts[chunk].append(fn(views))
        todo[chunk] -= len(batch_rows)
        if todo[chunk] == 0:
            writer.write(chunk, np.concatenate(parts.pop(chunk)))
        done_images += len(batch_rows)
        bar.update(len(batch_rows))
    bar.close()
    return done_images
