"""Image folders (or the built-in set) -> checked images in WebDataset shards, split by split: what the
``shard`` stage runs. Decoding and checking happen in a worker pool; only accepted bytes reach a shard."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterator

from pipeline.core.config import Data, Shard
from pipeline.core.errors import RcgError
from pipeline.core.progress import progress
from pipeline.data import images
from pipeline.data.shards import Candidate, ShardWriter, display_path, key_for, scan_folder
from pipeline.data.synthetic import write_builtin

_policy: images.ImagePolicy | None = None  # each pool worker's copy, set once by its initializer


def _init_worker(policy: images.ImagePolicy) -> None:
    global _policy
    _policy = policy


def load_and_check(candidate: Candidate) -> images.Accepted | str:
    """Worker: read one file and validate it; the reason (a string) when it is rejected."""
    try:
        with open(candidate.path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return images.check_image(data, _policy)


def worker_count(requested: int) -> int:
    """``shard.workers``, 0 meaning every core this process may use."""
    return requested or len(os.sched_getaffinity(0))


@contextlib.contextmanager
def check_pool(cfg: Shard) -> Iterator:
    """A worker pool that checks images under the ``shard`` section's policy (forked where the OS allows)."""
    policy = images.ImagePolicy(cfg.resize_short_side, cfg.reencode_format, cfg.jpeg_quality, cfg.min_side,
                                cfg.max_pixels, cfg.max_aspect)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(worker_count(cfg.workers), _init_worker, (policy,)) as pool:
        yield pool


def image_sources(data: Data, scratch: Path, pool) -> list[tuple[str, Path]]:
    """(split, folder) pairs to shard: the user's folders, or the built-in set rendered into ``scratch``."""
    if data.source == "builtin":
        b = data.builtin
        out = [("train", write_builtin(scratch, "train", b.num_train, b.image_size, b.seed, pool))]
        if b.num_val:
            out.append(("val", write_builtin(scratch, "val", b.num_val, b.image_size, b.seed, pool)))
        return out
    out = [("train", data.folder)]
    if data.val_folder is not None:
        out.append(("val", data.val_folder))
    return out


def shard_split(split: str, folder: Path, out: Path, cfg: Shard, pool, classes_ref: list[str] | None):
    """Shard one split into ``out``; returns (index rows, reject rows, classes, warnings, files found)."""
    classes, candidates, rejects, warnings = scan_folder(folder)
    if classes_ref is not None and classes and classes != classes_ref:
        raise RcgError(f"{folder}: class folders differ from the train split's ({len(classes)} vs "
                       f"{len(classes_ref)}); the val split must use the same classes")
    found = len(candidates) + len(rejects)
    reject_rows = [{"split": split, "source": display_path(rel), "reason": why} for rel, why in rejects]
    writer = ShardWriter(out, split, cfg.max_per_shard, cfg.max_shard_bytes)
    rows, keys = [], {}
    results = pool.imap(load_and_check, candidates, chunksize=64)
    for cand, result in zip(candidates, progress(results, total=len(candidates), desc=f"shard {split}",
                                                 unit="img")):
        source = display_path(cand.relpath)
        if isinstance(result, str):
            reject_rows.append({"split": split, "source": source, "reason": result})
            continue
        key = key_for(cand.relpath)
        if key in keys:  # a 96-bit hash collision: refuse rather than silently alias two images
            raise RcgError(f"key collision between {keys[key]} and {source}")
        keys[key] = source
        shard, offset = writer.add(key, result.ext, result.data, cand.label)
        rows.append({"split": split, "idx": len(rows), "key": key, "label": cand.label, "shard": shard,
                     "offset": offset, "nbytes": len(result.data), "ext": result.ext, "width": result.width,
                     "height": result.height, "sha256": result.sha256, "source": source})
    writer.close()
    if not rows:
        raise RcgError(f"no usable image in {folder} ({found} files found, all rejected"
                       + (f"; first reason: {reject_rows[0]['reason']}" if reject_rows else "") + ")")
    return rows, reject_rows, classes, warnings, found
