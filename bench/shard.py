"""Shard throughput vs the bare decode-and-verify loop over the same files, same cores, same run.

    python bench/shard.py [--limit N] [--repeats R]

The stage's own overhead (scan, IPC, hashing, tar writing, index) is the gap between the two; target
ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cifar10, run_stage  # noqa: E402
from pipeline.core.config import validate  # noqa: E402
from pipeline.data.shards import scan_folder  # noqa: E402


def decode_and_verify(path: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.size[0]


def bare(paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap(decode_and_verify, paths, chunksize=64):
            pass
    return len(paths) / (time.perf_counter() - start)


def staged(folder: Path, workers: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        params = validate({"data": {"source": "folder", "folder": str(folder)},
                           "shard": {"workers": workers, "max_per_shard": 5000},
                           "paths": {"data": str(out / "data"), "metrics": str(out / "metrics")}})
        summary = run_stage("shard", params, out)  # its own clock: from the start of run() to its end
        return summary["splits"]["train"]["accepted"] / summary["seconds"]
    finally:
        shutil.rmtree(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="use the first N classes' worth of files (0 = all)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ["RCG_PROGRESS"] = "0"
    folder = cifar10() / "train"
    if args.limit:  # a smaller folder with the first N files, same layout
        small = Path(tempfile.mkdtemp(prefix="bench-cifar-"))
        _, cands, _, _ = scan_folder(folder)
        for c in cands[: args.limit]:
            (small / c.relpath).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(c.path, small / c.relpath)
        folder = small
    _, cands, _, _ = scan_folder(folder)
    paths = [c.path for c in cands]
    workers = len(os.sched_getaffinity(0))
    rows = []
    for r in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        b, s = bare(paths, workers), staged(folder, workers)
        rows.append((b, s))
        print(f"run {r}: bare {b:8.0f} img/s   shard stage {s:8.0f} img/s   ratio {s / b:.3f}")
    best_b, best_s = max(b for b, _ in rows), max(s for _, s in rows)
    print(f"{len(paths)} images, {workers} workers: best bare {best_b:.0f} img/s, best shard {best_s:.0f} img/s, "
          f"ratio {best_s / best_b:.3f}")


if __name__ == "__main__":
    main()
