"""Stage ``shard``: an image folder (or the built-in set) -> WebDataset shards + index + rejects."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.data import images
from pipeline.core.artifacts import atomic_dir, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.core.progress import log, progress
from pipeline.data.shards import (INDEX_FILE, INDEX_SCHEMA, META_FILE, REJECTS_FILE, REJECTS_SCHEMA, Candidate,
                             ShardWriter, display_path, key_for, scan_folder, write_table)
from pipeline.data.synthetic import CLASSES, write_builtin

FORMAT = "rcg-shards"
_policy: images.ImagePolicy | None = None


def _init_worker(policy: images.ImagePolicy) -> None:
    global _policy
    _policy = policy


def load_and_check(candidate: Candidate) -> images.Accepted | str:
    """Worker: read one file and validate it (runs in the pool)."""
    try:
        with open(candidate.path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return images.check_image(data, _policy)


def worker_count(requested: int) -> int:
    return requested or len(os.sched_getaffinity(0))


def shard_split(split: str, folder: Path, out: Path, params: Params, pool, classes_ref: list[str] | None):
    """Shard one split; returns (index rows, reject rows, classes, warnings, found)."""
    classes, candidates, rejects, warnings = scan_folder(folder)
    if classes_ref is not None and classes and classes != classes_ref:
        raise RcgError(f"{folder}: class folders differ from the train split's ({len(classes)} vs "
                       f"{len(classes_ref)}); the val split must use the same classes")
    found = len(candidates) + len(rejects)
    reject_rows = [{"split": split, "source": display_path(rel), "reason": why} for rel, why in rejects]
    writer = ShardWriter(out, split, params.shard.max_per_shard, params.shard.max_shard_bytes)
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


def _sources(params: Params, scratch: Path, pool) -> list[tuple[str, Path]]:
    if params.data.source == "builtin":
        b = params.data.builtin
        out = [("train", write_builtin(scratch, "train", b.num_train, b.image_size, b.seed, pool))]
        if b.num_val:
            out.append(("val", write_builtin(scratch, "val", b.num_val, b.image_size, b.seed, pool)))
        return out
    out = [("train", params.data.folder)]
    if params.data.val_folder is not None:
        out.append(("val", params.data.val_folder))
    return out


def run(params: Params) -> dict:
    out_dir = params.paths.shards
    s = params.shard
    policy = images.ImagePolicy(s.resize_short_side, s.reencode_format, s.jpeg_quality, s.min_side,
                                s.max_pixels, s.max_aspect)
    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".builtin-", dir=out_dir.parent))
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    try:
        with atomic_dir(out_dir) as tmp, ctx.Pool(worker_count(s.workers), _init_worker, (policy,)) as pool:
            sources = _sources(params, scratch, pool)
            index, rejects, splits, warnings, classes = [], [], {}, [], None
            for split, folder in sources:
                rows, rej, cls, warn, found = shard_split(split, folder, tmp, params, pool, classes)
                classes = cls if classes is None else classes
                index += rows
                rejects += rej
                warnings += [f"{split}: {w}" for w in warn]
                splits[split] = {"found": found, "accepted": len(rows), "rejected": len(rej),
                                 "shards": len({r["shard"] for r in rows}),
                                 "folder": "<builtin>" if params.data.source == "builtin" else str(folder)}
                assert len(rows) + len(rej) == found, "every file found must be accepted or rejected"
            if params.data.source == "builtin":
                classes = CLASSES
            write_table(index, INDEX_SCHEMA, tmp / INDEX_FILE)
            write_table(rejects, REJECTS_SCHEMA, tmp / REJECTS_FILE)
            summary = {"format": FORMAT, "version": 1, "classes": classes, "splits": splits,
                       "warnings": warnings, "params": {"data": params.section("data"),
                                                        "shard": params.section("shard")}}
            write_json(tmp / META_FILE, summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - start
    for w in warnings:
        log(f"warning: {w}")
    total = sum(v["accepted"] for v in splits.values())
    return {"output": str(out_dir), "splits": splits, "classes": len(classes),
            "images_per_s": round(total / elapsed, 1), "seconds": round(elapsed, 2)}
