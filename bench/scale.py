"""Memory and speed of the data path at ImageNet size, without images: synthetic stores and a synthetic index.

    python -m bench.scale [--rows 1281167] [--views 4] [--steps 30] [--root DIR] [--json FILE]

Builds, in a temporary folder (or ``--root``): an ``index.parquet`` of ``--rows`` train rows (1000 classes, 1000
images a shard), ``reps.zarr`` (float32 [N, V, 256]) and ``tokens.zarr`` (uint16 [N, V, 16, 16], 1024 codes), both
written by the stages' own StoreWriter. Then each reader runs in a fresh process, so that its peak RSS is its own:

- index: ``ShardSet`` (numpy columns) against the old layout (one Python list per column, ``to_pydict``), and a
  forked loader worker that reads every row once (with lists each read writes a reference count, so the worker
  copies the pages it touches);
- rdm / pixel: ``RepBatches`` (global batch 512) and ``PixelBatches`` (global batch 4096, with each row's rep) on the
  memory-mapped stores, against the same batch code on in-memory arrays read the old way (float32 reps, int32
  tokens); both must draw bit-identical batches. The decode into ``<root>/data/cache/`` is timed on its own first;
  a mapped loader starts on a cold page cache (its first ``--steps`` batches read from disk), then ``--steps`` more
  run once the copies are in the page cache (the steady state after a first epoch);
- shared: two processes (two ranks of one node, each its half of the RDM batch) on the mapped reps at once: their
  PSS (proportional set size) shows the page cache's copy split between them.

Memory figures come from /proc: peak RSS (VmHWM), and at the end RSS, its anonymous part (the process's own heap),
PSS and USS (private pages); ``floor`` is a process that imported the same modules and read nothing. Printed as
one JSON object per line and, with ``--json``, saved together. ~5 min on 2 cores (bench/RESULTS.md, "scale").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.data.stores import StoreWriter  # noqa: E402

IMAGENET_ROWS, DIM, GRID, CODES, CLASSES, PER_SHARD, CHUNK = 1281167, 256, 16, 1024, 1000, 1000, 1024
RDM_BATCH, PIXEL_BATCH, SEED = 512, 4096, 0
GIB = 2 ** 30


def memory() -> dict:
    """This process's memory (GiB): peak RSS, RSS, its anonymous part, PSS and USS."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    kib = lambda d, k: int(d[k].split()[0])  # noqa: E731
    gib = lambda x: round(x / 2 ** 20, 3)  # noqa: E731
    return {"peak_rss": gib(kib(status, "VmHWM")), "rss": gib(kib(status, "VmRSS")),
            "rss_anon": gib(kib(status, "RssAnon")), "pss": gib(kib(rollup, "Pss")),
            "uss": gib(kib(rollup, "Private_Clean") + kib(rollup, "Private_Dirty"))}


# ------------------------------------------------------------------------------------------------ building
def write_index(shards: Path, rows: int) -> None:
    """An index.parquet like the shard stage's for ``rows`` ImageNet-like train images (no tars)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.data.shards import INDEX_SCHEMA, key_for

    idx = np.arange(rows)
    wnids = [f"n{1440764 + c:08d}" for c in range(CLASSES)]
    label = idx * CLASSES // rows
    source = [f"{wnids[c]}/{wnids[c]}_{i}.JPEG" for i, c in zip(idx.tolist(), label.tolist())]
    columns = {"split": pa.array(["train"] * rows), "idx": idx, "key": [key_for(s) for s in source], "label": label,
               "shard": [f"train-{i // PER_SHARD:06d}.tar" for i in range(rows)],
               "offset": idx % PER_SHARD * 112 * 1024 + 512, "nbytes": np.full(rows, 110_000),
               "ext": pa.array(["jpg"] * rows), "width": np.full(rows, 500, np.int32),
               "height": np.full(rows, 375, np.int32),
               "sha256": [hashlib.sha256(s.encode()).hexdigest() for s in source], "source": source}
    shards.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=INDEX_SCHEMA), shards / "index.parquet")


def write_stores(data: Path, rows: int, views: int) -> None:
    """reps.zarr and tokens.zarr of ``rows`` images as encode / tokenize write them, chunk by chunk."""
    labels = np.arange(rows) * CLASSES // rows
    shared = {"views": {"count": views, "crop": 256}, "index": {"sha256": "0" * 64, "split": "train", "rows": rows}}
    stores = {"reps": ({**shared, "encoder": {"sha256": "1" * 64}, "dim": DIM}, (rows, views, DIM), "float32"),
              "tokens": ({**shared, "tokenizer": {"sha256": "2" * 64}, "grid": [GRID, GRID], "codebook_size": CODES},
                         (rows, views, GRID, GRID), "uint16")}
    for name, (identity, shape, dtype) in stores.items():
        writer = StoreWriter(data / f"{name}.zarr", name, shape, dtype, CHUNK, identity, labels)
        for c in writer.pending():
            r = writer.rows(c)
            rng = np.random.default_rng([SEED, c])
            block = (rng.standard_normal((len(r), *shape[1:]), dtype=np.float32) if name == "reps"
                     else rng.integers(0, CODES, (len(r), *shape[1:]), dtype=np.uint16))
            writer.write(c, block)
        writer.finalize()


# ------------------------------------------------------------------------------------------------ readers
def read_whole(path: Path, name: str, dtype) -> np.ndarray:
    """The old loaders' read: the whole array in memory, chunk by chunk."""
    from pipeline.data.stores import open_store
    arr = open_store(path, name)[name]
    out = np.empty(arr.shape, dtype=dtype)
    for start in range(0, arr.shape[0], arr.chunks[0]):
        out[start:start + arr.chunks[0]] = arr[start:start + arr.chunks[0]]
    return out


def measure_index(root: Path, layout: str) -> dict:
    import pyarrow.parquet as pq
    from pipeline.data.shards import ShardSet

    tic = time.perf_counter()
    if layout == "columns":
        shards = ShardSet(root / "shards")
        rows = len(shards)
        columns = [shards.keys._bytes, shards._shard, shards._offset, shards._nbytes, shards.labels]
    else:  # the old ShardSet: to_pydict of the split's rows, one Python list per column
        table = pq.read_table(root / "shards" / "index.parquet", filters=[("split", "=", "train")])
        cols = table.to_pydict()
        del table
        columns = [cols["key"], cols["shard"], cols["offset"], cols["nbytes"], cols["label"]]  # what it kept
        del cols
        rows = len(columns[0])
    seconds = time.perf_counter() - tic
    parent = memory()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a loader worker: reads every row's entries once
        os.close(read)
        for i in range(rows):
            for column in columns:
                column[i]
        os.write(write, json.dumps(memory()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        worker = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return {"layout": layout, "rows": rows, "load_s": round(seconds, 2), **parent,
            "worker_uss_after_one_pass": worker["uss"]}


def drop_page_cache(folder: Path) -> None:
    """Evict the decoded copies' pages from the page cache (clean pages of files no other process maps), so
    that a mapped loader starts cold, as on a node that has not read them yet."""
    for path in folder.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(folder: Path) -> None:
    """Read the decoded copies once, sequentially: the page cache then holds them, as after a run's first epoch."""
    for path in folder.glob("*.npy"):
        with open(path, "rb") as f:
            while f.read(64 * 2 ** 20):
                pass


def measure_loader(root: Path, kind: str, layout: str, steps: int, rank: int, world: int) -> dict:
    """Batches/s and memory of the RDM or pixel loader on the mapped stores or on in-memory arrays: ``steps``
    batches from a cold page cache (mapped, one process: the first thing a run does), then ``steps`` more once the
    page cache holds the copies (the steady state)."""
    import torch
    from pipeline.core.config import RdmModel
    from pipeline.core.distributed import Dist
    from pipeline.data.pixel_data import PixelBatches, load_pixel_data
    from pipeline.data.rep_store import RepBatches, load_store

    torch.set_num_threads(1)
    data_dir, cpu, d = root / "data", torch.device("cpu"), Dist(rank, world, rank)
    if layout == "mapped" and world == 1:
        drop_page_cache(data_dir / "cache")
    tic = time.perf_counter()
    if kind == "rdm":
        store = load_store(data_dir / "reps.zarr", RdmModel(in_channels=DIM), cpu)
        if layout == "memory":
            store = replace(store, reps=torch.from_numpy(read_whole(data_dir / "reps.zarr", "reps", np.float32)))
        batches = RepBatches(store, RDM_BATCH // world, SEED, d)

        def batch(it: int) -> list[torch.Tensor]:
            x0, rows, _ = batches(it)
            return [x0, store.labels[rows]]
    else:
        data = load_pixel_data(data_dir / "tokens.zarr", data_dir / "reps.zarr", "rep", 50, SEED, cpu)
        if layout == "memory":
            n, v = data.tokens.shape[:2]
            data = replace(data, tokens=torch.from_numpy(read_whole(data_dir / "tokens.zarr", "tokens", np.int32))
                           .reshape(n, v, -1), reps=torch.from_numpy(read_whole(data_dir / "reps.zarr", "reps",
                                                                                np.float32)))
        batches = PixelBatches(data, PIXEL_BATCH, 1, SEED, d)

        def batch(it: int) -> list[torch.Tensor]:
            rows, views, _ = batches(it)[0]
            return [data.tokens_at(rows, views), data.reps_at(rows, views)]
    load_s = time.perf_counter() - tic
    digest, rates = hashlib.sha256(), []
    for first in (0, steps):
        if first and layout == "mapped":
            read_through(data_dir / "cache")
        tic = time.perf_counter()
        for it in range(first, first + steps):
            for t in batch(it):
                digest.update(t.numpy().tobytes())
        rates.append(steps / (time.perf_counter() - tic))
    per_batch = RDM_BATCH // world if kind == "rdm" else PIXEL_BATCH
    return {"loader": kind, "layout": layout, "rank": rank, "world": world, "batch": per_batch,
            "load_s": round(load_s, 2), "first_batches_per_s": round(rates[0], 2),
            "batches_per_s": round(rates[1], 2), "rows_per_s": round(rates[1] * per_batch), **memory(),
            "digest": digest.hexdigest()[:16]}


def measure_floor() -> dict:
    """A process that imported what the readers import and read nothing: the floor under every figure."""
    import torch  # noqa: F401
    import pipeline.data.pixel_data  # noqa: F401
    import pipeline.data.shards  # noqa: F401
    return memory()


def measure_decode(root: Path) -> dict:
    """The one-time decode of both stores into their memory-mapped copies."""
    import torch
    from pipeline.data.pixel_data import load_pixel_data

    tic = time.perf_counter()
    load_pixel_data(root / "data" / "tokens.zarr", root / "data" / "reps.zarr", "rep", 50, SEED, torch.device("cpu"))
    sizes = {p.name.split(".")[0]: round(p.stat().st_size / GIB, 3) for p in (root / "data" / "cache").glob("*.npy")}
    return {"decode_s": round(time.perf_counter() - tic, 1), "cache_gib": sizes, **memory()}


# ------------------------------------------------------------------------------------------------ driver
def child(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RCG_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bench.scale", "--root", str(root), "--measure", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a measurement failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def run(root: Path, rows: int, views: int, steps: int) -> list[dict]:
    tic = time.perf_counter()
    write_index(root / "shards", rows)
    index_s = time.perf_counter() - tic
    write_stores(root / "data", rows, views)
    out = [{"what": "build", "rows": rows, "views": views, "index_s": round(index_s, 1),
            "stores_s": round(time.perf_counter() - tic - index_s, 1),
            "zarr_gib": {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / GIB, 3)
                         for p in sorted((root / "data").glob("*.zarr"))}}]
    out.append({"what": "floor", **result(child(root, "floor"))})
    out.append({"what": "decode", **result(child(root, "decode"))})
    for layout in ("columns", "lists"):
        out.append({"what": "index", **result(child(root, "index", layout))})
    loaders = {}
    for kind in ("rdm", "pixel"):
        for layout in ("mapped", "memory"):
            loaders[kind, layout] = result(child(root, kind, layout, str(steps)))
            out.append({"what": "loader", **loaders[kind, layout]})
        if loaders[kind, "mapped"]["digest"] != loaders[kind, "memory"]["digest"]:
            raise SystemExit(f"{kind}: the mapped and in-memory loaders drew different batches")
    ranks = [child(root, "rdm", "mapped", str(steps), str(r), "2") for r in range(2)]
    out.extend({"what": "shared", **result(p)} for p in ranks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=IMAGENET_ROWS, help="images (ImageNet's train split: 1281167)")
    ap.add_argument("--views", type=int, default=4, help="views per image in the stores")
    ap.add_argument("--steps", type=int, default=30, help="timed batches per loader, twice (first, then steady)")
    ap.add_argument("--root", type=Path, help="build here and keep it (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="also save every result line in this file")
    ap.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = ap.parse_args()
    if args.measure:
        kind, *rest = args.measure
        if kind == "floor":
            print(json.dumps(measure_floor()))
        elif kind == "decode":
            print(json.dumps(measure_decode(args.root)))
        elif kind == "index":
            print(json.dumps(measure_index(args.root, rest[0])))
        else:
            layout, steps, *rank_world = rest
            rank, world = (int(x) for x in rank_world) if rank_world else (0, 1)
            print(json.dumps(measure_loader(args.root, kind, layout, int(steps), rank, world)))
        return
    with tempfile.TemporaryDirectory(prefix="rcg-scale-") as tmp:
        root = args.root or Path(tmp)
        lines = run(root, args.rows, args.views, args.steps)
    for line in lines:
        print(json.dumps(line))
    if args.json:
        args.json.write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
