"""The loop behind ``encode`` and ``tokenize``: every view of every image through a model, once, into a store.

Batches never cross a chunk boundary, so what a chunk holds depends only on its rows and the batch size:
the same bytes whether the run was resumed, split across ranks, or done in one go.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.artifacts import file_sha256
from pipeline.core.config import Encode, Tokenize
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import progress
from pipeline.core.runtime import precision
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.data.stores import StoreWriter
from pipeline.data.views import ViewRecipe, all_views


def views_to_float(views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 views [B, V, H, W, 3] -> float [B * V, 3, H, W] in [0, 1] on ``device``, converted there (a quarter
    of the bytes to copy): what every model that fills a view store takes."""
    b, v, h, w, c = views.shape
    return views.to(device, non_blocking=True).reshape(b * v, h, w, c).permute(0, 3, 1, 2).float().div(255).contiguous()


def index_digests(shards: ShardSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The sha256 that ``index.parquet`` recorded for every row of the split as raw digests uint8 [N, 32], with
    each row's shard file (int32 codes into the list of names): 36 bytes a row, no Python object per row."""
    index = shards.dir / INDEX_FILE
    table = pq.read_table(index, columns=["shard", "sha256"], filters=[("split", "=", shards.split)],
                          read_dictionary=["shard"]).unify_dictionaries()
    hexes = table.column("sha256").combine_chunks()
    offsets = np.frombuffer(hexes.buffers()[1], np.int32)[hexes.offset:hexes.offset + len(hexes) + 1]
    if len(hexes) != len(shards) or hexes.null_count or not (np.diff(offsets) == 64).all():
        raise RcgError(f"{index}: the sha256 column does not hold one 64-digit hex digest per row; rerun rcg shard")
    text = np.frombuffer(hexes.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 32, 2)
    nibble = np.full(256, 255, np.uint8)
    nibble[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
    digits = nibble[text]
    if (digits == 255).any():
        raise RcgError(f"{index}: the sha256 column holds a character that is not a lowercase hex digit")
    shard = table.column("shard").combine_chunks()
    return (digits[..., 0] << 4) | digits[..., 1], shard.indices.to_numpy().astype(np.int32), \
        shard.dictionary.to_pylist()


class ViewsDataset(Dataset):
    """Image ``idx`` of a shard split as all its views: uint8 [V, crop, crop, 3].

    Every image's bytes are checked against the sha256 the index recorded when it was sharded, so a flipped bit
    in a tar stops the run instead of becoming a different rep; this and a decode failure name the shard file and
    the sample."""

    def __init__(self, shards: ShardSet, recipe: ViewRecipe):
        self.shards, self.recipe = shards, recipe
        self.digests, self.shard_codes, self.shard_names = index_digests(shards)

    def __len__(self) -> int:
        return len(self.shards)

    def _where(self, idx: int) -> str:
        shard = self.shards.dir / self.shard_names[self.shard_codes[idx]]
        return f"{shard}, sample {idx} (key {self.shards.keys[idx]})"

    def __getitem__(self, idx: int) -> torch.Tensor:
        data = self.shards.read(idx)
        if hashlib.sha256(data).digest() != self.digests[idx].tobytes():
            raise RcgError(f"{self._where(idx)}: the image bytes differ from the sha256 in {INDEX_FILE} (the shard "
                           "is damaged); rerun rcg shard")
        try:
            views = all_views(data, self.shards.keys[idx], self.recipe)
        except Exception as exc:  # PIL raises many types for undecodable bytes
            raise RcgError(f"{self._where(idx)}: cannot decode the image ({type(exc).__name__}: {exc})") from exc
        return torch.from_numpy(views)


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
    with worker_errors_as_one_line():
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


@contextlib.contextmanager
def worker_errors_as_one_line() -> Iterator[None]:
    """A loader worker's RcgError comes back carrying the worker's whole traceback; keep the line it said."""
    try:
        yield
    except RcgError as exc:
        text = str(exc).strip()
        if not text.startswith("Caught RcgError in DataLoader worker"):
            raise
        raise RcgError(text.splitlines()[-1].removeprefix(f"{RcgError.__module__}.RcgError: ")) from exc


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
        "compute": {"device": device.type, "precision": precision(cfg.bf16, device),
                    "batch_size": cfg.batch_size},
    }
    writer = StoreWriter(path, array, (n, recipe.count, *item_shape), dtype, cfg.chunk_size, identity,
                         np.asarray(shards.labels, dtype=np.int64), d.rank, d.barrier)
    start = time.perf_counter()
    done = fill_store(writer, ViewsDataset(shards, recipe), fn, cfg.batch_size, cfg.workers, d, desc)
    seconds = time.perf_counter() - start
    return writer, {"images": done, "seconds": round(seconds, 2),
                    "images_per_s": round(done / seconds, 1) if done else None}
