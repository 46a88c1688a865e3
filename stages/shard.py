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
from pipeline.data.ingest import check_pool, image_sources, scan_sources, shard_split
from pipeline.data.shards import INDEX_FILE, INDEX_SCHEMA, META_FILE, REJECTS_FILE, REJECTS_SCHEMA, write_table

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
            sources = image_sources(params.data, scratch, pool)
            parts, classes, warnings = scan_sources(params.data, sources, params.seed)
            index, rejects, splits, emptied = [], [], {}, []
            for part in parts:
                rows, rej, found, lost = shard_split(part, tmp, params.shard, pool, classes)
                index += rows
                rejects += rej
                emptied += lost
                warnings += [f"{part.split}: class folder {e['class']} (label {e['label']}): every file was rejected, "
                             "so the label has no image there (rejects.parquet says why)" for e in lost]
                splits[part.split] = {"found": found, "accepted": len(rows), "rejected": len(rej),
                                      "shards": len({r["shard"] for r in rows}),
                                      "folder": "<builtin>" if params.data.source == "builtin" else str(part.folder)}
                assert len(rows) + len(rej) == found, "every file found must be accepted or rejected"
            if "val" in splits and params.data.source == "folder" and params.data.val_folder is None:
                splits["val"]["held_out"] = {"fraction": params.data.holdout, "seed": params.seed}
            labelled = bool(classes)
            write_table(index, INDEX_SCHEMA, tmp / INDEX_FILE)
            write_table(rejects, REJECTS_SCHEMA, tmp / REJECTS_FILE)
            write_json(tmp / META_FILE, {"format": FORMAT, "version": 1, "labels": labelled, "classes": classes,
                                         "classes_without_images": emptied, "splits": splits,
                                         "warnings": warnings, "params": {"data": params.section("data"),
                                                                          "shard": params.section("shard")}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - start
    for w in warnings:
        log(f"warning: {w}")
    total = sum(v["accepted"] for v in splits.values())
    return {"output": str(out_dir), "splits": splits, "labels": labelled, "classes": len(classes),
            "images_per_s": round(total / elapsed, 1), "seconds": round(elapsed, 2)}
