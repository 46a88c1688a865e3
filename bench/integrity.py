"""What the integrity checks of issue 24 cost, as ratios against the same work unchecked.

    python bench/integrity.py [--images 2000] [--rows 40000]

1. Shard reads: what ``ViewsDataset`` adds per image (sha256 of the stored bytes, compared with index.parquet's)
   against what it did before (decode and views), over every train image already in memory, for the built-in 32 px
   PNGs at the default views and for 256 px PNGs at ImageNet's views (resize 256, crop 224); ratio = (check +
   decode) / decode. It bounds what encode/tokenize pay: their model forward comes on top of both.
2. Store reads: what :func:`open_store` adds to reading a whole ``reps`` array [rows, 2, 256] float32 (a stat per
   chunk file, then a CRC-32 of each chunk's bytes as it is read) against the plain Zarr read; ratio = (checks +
   read) / read. And the chunk manifest written at finalize (every chunk file read once) against the store's writes.
Checked and unchecked passes alternate (the machine is shared); each figure is the best of 5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import builtin_shards  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.data.shards import ShardSet  # noqa: E402
from pipeline.data.stores import StoreWriter, chunk_damage, chunk_manifest  # noqa: E402
from pipeline.data.view_store import ViewsDataset  # noqa: E402
from pipeline.data.views import ViewRecipe, all_views  # noqa: E402


def best_of(fns: list[Callable[[], object]], passes: int = 5) -> list[float]:
    """Best time of each function over ``passes`` rounds, the functions taking turns within a round."""
    times = [[] for _ in fns]
    for _ in range(passes):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def shard_reads(root: Path, images: int, overrides: list[str]) -> dict:
    root.mkdir()
    params = load_params(None, builtin_shards(root, images, overrides))
    shards = ShardSet(params.paths.shards)
    recipe = ViewRecipe(**params.views.model_dump())
    digests = ViewsDataset(shards, recipe).digests
    blobs = [shards.read(i) for i in range(len(shards))]
    check_s, decode_s = best_of([
        lambda: [hashlib.sha256(blob).digest() == digests[i].tobytes() for i, blob in enumerate(blobs)],
        lambda: [all_views(blob, shards.keys[i], recipe) for i, blob in enumerate(blobs)]])
    return {"images": len(blobs), "bytes_per_image": sum(map(len, blobs)) // len(blobs),
            "check_us_per_image": round(check_s / len(blobs) * 1e6, 1),
            "decode_views_us_per_image": round(decode_s / len(blobs) * 1e6, 1),
            "ratio": round((check_s + decode_s) / decode_s, 3)}


def store_reads(root: Path, rows: int) -> dict:
    values = np.random.default_rng(0).normal(size=(rows, 2, 256)).astype(np.float32)
    writer = StoreWriter(root / "reps.zarr", "reps", values.shape, "float32", 1024, {"bench": 1}, np.arange(rows))
    start = time.perf_counter()
    for chunk in writer.pending():
        writer.write(chunk, values[writer.rows(chunk).start:writer.rows(chunk).stop])
    write_s = time.perf_counter() - start
    manifest_s, = best_of([lambda: chunk_manifest(writer.partial)])
    writer.finalize()
    store = root / "reps.zarr"
    attrs = zarr.open_group(str(store), mode="r").attrs.asdict()
    files = {key: (store / key).read_bytes() for key in attrs["chunks"]}
    read_s, stat_s, crc_s = best_of([lambda: zarr.open_group(str(store), mode="r")["reps"][:],
                                     lambda: chunk_damage(store, attrs),
                                     lambda: [zlib.crc32(data) for data in files.values()]])
    return {"mb": round(values.nbytes / 1e6), "read_s": round(read_s, 3), "stat_s": round(stat_s, 4),
            "crc_s": round(crc_s, 3), "read_ratio": round((read_s + stat_s + crc_s) / read_s, 3),
            "write_s": round(write_s, 3), "manifest_s": round(manifest_s, 3),
            "manifest_vs_write": round(manifest_s / write_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=40000)
    args = parser.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["shards_32px_default_views"] = shard_reads(Path(tmp) / "a", args.images, [])
        out["shards_256px_views_256_224"] = shard_reads(
            Path(tmp) / "b", args.images // 4, ["data.builtin.image_size=256", "views.resize=256", "views.crop=224"])
        out["store"] = store_reads(Path(tmp), args.rows)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
