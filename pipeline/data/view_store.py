"""The loop behind ``encode`` and ``tokenize``: every view of every image through a model, once, into a store.

Batches never cross a chunk boundary, so what a chunk holds depends only on its rows and the batch size:
the same bytes whether the run was resumed, split across ranks, or done in one go.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.artifacts import file_sha256
from pipeline.core.config import Encode, Tokenize
from pipeline.core.distributed import Dist
from pipeline.core.progress import progress
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.data.stores import StoreWriter
from pipeline.data.views import ViewRecipe, all_views


def views_to_float(views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 views [B, V, H, W, 3] -> float [B * V, 3, H, W] in [0, 1] on ``device``, converted there (a quarter
    of the bytes to copy): what every model that fills a view store takes."""
    b, v, h, w, c = views.shape
    return views.to(device, non_blocking=True).reshape(b * v, h, w, c).permute(0, 3, 1, 2).float().div(255).contiguous()


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


def build_view_store(path: Path, array: str, shards_dir: Path, recipe: ViewRecipe, model_identity: dict,
                     item_shape: tuple[int, ...], dtype: str, fn: Callable[[torch.Tensor], np.ndarray],
                     cfg: Encode | Tokenize, device: torch.device, d: Dist, desc: str) -> tuple[StoreWriter, dict]:
    """Fill this rank's part of ``<path>.partial`` with ``fn`` over every view of the train split.

    ``array`` [N, V, *item_shape]. The identity is the model's (``model_identity``) plus what every view store
    shares: the view recipe, the shard index, and the compute settings that decide the bytes (so a partial
    written otherwise is redone, and the store stays bit-identical). ``cfg`` is the stage's section. Returns the writer (rank 0 finalises it) and timing stats.
    """
    shards = ShardSet(shards_dir, "train")
    n = len(shards)
    identity = {
        **model_identity,
        "views": recipe.describe(),
        "index": {"sha256": file_sha256(Path(shards_dir) / INDEX_FILE), "split": "train", "rows": n},
        "compute": {"device": device.type, "precision": "bf16" if cfg.bf16 and device.type == "cuda" else "fp32",
                    "batch_size": cfg.batch_size},
    }
    writer = StoreWriter(path, array, (n, recipe.count, *item_shape), dtype, cfg.chunk_size, identity,
                         np.asarray(shards.labels, dtype=np.int64), d.rank, d.barrier)
    start = time.perf_counter()
    done = fill_store(writer, ViewsDataset(shards, recipe), fn, cfg.batch_size, cfg.workers, d, desc)
    seconds = time.perf_counter() - start
    return writer, {"images": done, "seconds": round(seconds, 2),
                    "images_per_s": round(done / seconds, 1) if done else None}
