"""Stage ``shard``: an image folder (or the built-in set) -> WebDataset shards + index + rejects + meta.

Each split is checked and sharded by :mod:`pipeline.data.ingest`; this page writes the declared output folder
(atomically: a killed run leaves the previous one in place).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from pipeline.core.artifacts import atomic_dir, write_json
from pipeline.core.config import Params
from pipeline.core.errors import require_dir
from pipeline.core.progress import log
from pipeline.data.ingest import check_pool, image_sources, shard_split
from pipeline.data.shards import INDEX_FILE, INDEX_SCHEMA, META_FILE, REJECTS_FILE, REJECTS_SCHEMA, write_table
from pipeline.data.synthetic import CLASSES

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "data", "shard"]

FORMAT = "rcg-shards"


def run(params: Params) -> dict:
    if params.data.source == "folder":
        require_dir(params.data.folder, "data.folder")
        require_dir(params.data.val_folder, "data.val_folder")
    out_dir = params.paths.shards
    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".builtin-", dir=out_dir.parent))
    try:
        with atomic_dir(out_dir) as tmp, check_pool(params.shard) as pool:
            index, rejects, splits, warnings, classes = [], [], {}, [], None
            for split, folder in image_sources(params.data, scratch, pool):
                rows, rej, cls, warn, found = shard_split(split, folder, tmp, params.shard, pool, classes)
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
            write_json(tmp / META_FILE, {"format": FORMAT, "version": 1, "classes": classes, "splits": splits,
                                         "warnings": warnings, "params": {"data": params.section("data"),
                                                                          "shard": params.section("shard")}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - start
    for w in warnings:
        log(f"warning: {w}")
    total = sum(v["accepted"] for v in splits.values())
    return {"output": str(out_dir), "splits": splits, "classes": len(classes),
            "images_per_s": round(total / elapsed, 1), "seconds": round(elapsed, 2)}
