"""Image folders (or the built-in set) -> checked images in WebDataset shards, split by split: what the
``shard`` stage runs. Decoding and checking happen in a worker pool; only accepted bytes reach a shard."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

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


@dataclass
class Scanned:
    """What one split will shard: its candidates and the files the scan already rejected (relpath, reason)."""
    split: str
    folder: Path
    candidates: list[Candidate]
    rejects: list[tuple[str, str]]


def scan_sources(data: Data, sources: list[tuple[str, Path]], seed: int
                 ) -> tuple[list[Scanned], list[str], list[str]]:
    """Scan every source folder under ``data.labels`` -> (splits to shard, classes, warnings). A user's folder
    without a val_folder gives up a seeded ``data.holdout`` fraction of its candidates as the val split."""
    scanned, classes, warnings = [], None, []
    for split, folder in sources:
        cls, candidates, rejects, warn = scan_folder(folder, data.labels)
        if classes is not None and cls and cls != classes:
            raise RcgError(f"{folder}: class folders differ from the train split's ({len(cls)} vs {len(classes)}); "
                           "the val split must use the same classes")
        classes = cls if classes is None else classes
        warnings += [f"{split}: {w}" for w in warn]
        scanned.append(Scanned(split, folder, candidates, rejects))
    if data.source == "folder" and data.val_folder is None and data.holdout > 0:
        train = scanned[0]
        held = holdout_rows(len(train.candidates), data.holdout, seed)
        chosen = set(held.tolist())
        scanned = [Scanned("train", train.folder, [c for i, c in enumerate(train.candidates) if i not in chosen],
                           train.rejects),
                   Scanned("val", train.folder, [train.candidates[i] for i in held], [])]
    return scanned, classes or [], warnings


def holdout_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded, sorted draw of round(fraction * n) of ``n`` candidates (at least one, never all of them)."""
    count = min(max(1, round(fraction * n)), n - 1)
    if count <= 0:
        raise RcgError(f"data.holdout: {n} image file(s) found, too few to hold any out (add images, give "
                       "data.val_folder or set data.holdout: 0)")
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def shard_split(part: Scanned, out: Path, cfg: Shard, pool, classes: list[str]):
    """Shard one split into ``out``; returns (index rows, reject rows, files found, emptied classes): every class
    folder that had image files but kept none of them (each one rejected), as {split, class, label}."""
    found = len(part.candidates) + len(part.rejects)
    split = part.split
    reject_rows = [{"split": split, "source": display_path(rel), "reason": why} for rel, why in part.rejects]
    writer = ShardWriter(out, split, cfg.max_per_shard, cfg.max_shard_bytes)
    rows, keys = [], {}
    results = pool.imap(load_and_check, part.candidates, chunksize=64)
    for cand, result in zip(part.candidates, progress(results, total=len(part.candidates), desc=f"shard {split}",
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
        raise RcgError(f"no usable image in {part.folder} ({found} files found, all rejected"
                       + (f"; first reason: {reject_rows[0]['reason']}" if reject_rows else "") + ")")
    emptied = sorted({c.label for c in part.candidates} - {r["label"] for r in rows})
    return rows, reject_rows, found, [{"split": split, "class": display_path(classes[label]), "label": label}
                                      for label in emptied]
