"""Stores read through their decoded, memory-mapped copies: bounded per-process memory, one decode per identity."""

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from conftest import micro_params
from pipeline.core.errors import RcgError
from pipeline.data import mapped
from pipeline.data.pixel_data import load_pixel_data
from pipeline.data.rep_store import load_store
from test_train_pixel import write_stores
from test_train_rdm import identity, make_store

CPU = torch.device("cpu")


def held_bytes(fn) -> tuple[object, int]:
    """(fn(), bytes it allocated and still holds: numpy and torch CPU buffers are traced, file mappings are not)."""
    tracemalloc.start()
    try:
        out = fn()
        gc.collect()  # garbage in reference cycles is not held, though the collector may not have run yet
        return out, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


FRESH_LOAD = """
import sys, tracemalloc
from pathlib import Path
import torch
from conftest import micro_params
from pipeline.data.rep_store import load_store
params = micro_params(Path(sys.argv[1]))
load_store(params.paths.reps, params.rdm.model, torch.device("cpu"))  # builds the decoded copy
tracemalloc.start()
store = load_store(params.paths.reps, params.rdm.model, torch.device("cpu"))
print(tracemalloc.get_traced_memory()[0])
"""


def test_rep_store_is_mapped_not_copied(tmp_path):
    """Held bytes are measured in a fresh process: what one loader process owns, whatever earlier tests in this
    process left behind (in the full suite, lazily built state of other libraries can land inside the trace)."""
    n = 4000  # reps 4000 x 2 x 16 float32: 512 KB that the old loader copied into every process
    make_store(tmp_path, n=n)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    out = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path)], capture_output=True, text=True,
                         env=env, check=True).stdout
    held = int(out.split()[-1])
    assert held < 128 * 1024, f"{held} bytes held"  # the labels (32 KB) and bookkeeping, not the reps
    params = micro_params(tmp_path)
    store = load_store(params.paths.reps, params.rdm.model, CPU)
    assert store.reps.shape == (n, 2, 16) and store.labels.device == CPU
    rows, views = torch.tensor([5, 3999, 5]), torch.tensor([1, 0, 0])
    assert torch.equal(store.gather(rows, views), store.reps[rows, views])


def test_pixel_data_keeps_uint16_tokens_mapped(tmp_path):
    write_stores(tmp_path, n=4000)  # tokens as int32 (the old loader) 512 KB, reps 512 KB
    params = micro_params(tmp_path)
    load_pixel_data(params.paths.tokens, params.paths.reps, "rep", 8, 0, CPU)
    data, held = held_bytes(lambda: load_pixel_data(params.paths.tokens, params.paths.reps, "rep", 8, 0, CPU))
    assert data.tokens.dtype == torch.uint16 and data.tokens.shape == (4000, 2, 16)
    assert held < 256 * 1024, f"{held} bytes held"  # labels and the row split (3 x 32 KB), not the stores
    rows, views = data.train_rows[:4], torch.tensor([0, 1, 1, 0])
    assert data.tokens_at(rows, views).dtype == torch.int64
    assert torch.equal(data.tokens_at(rows, views), data.tokens[rows, views].long())
    assert torch.equal(data.reps_at(rows, views), data.reps[rows, views])


def test_one_decode_per_identity_and_stale_copies_go(tmp_path, monkeypatch):
    decodes = []
    real = mapped._decode
    monkeypatch.setattr(mapped, "_decode", lambda *a: (decodes.append(a[2].name), real(*a))[1])
    params = micro_params(tmp_path)
    make_store(tmp_path)
    first = load_store(params.paths.reps, params.rdm.model, CPU).reps.clone()
    load_store(params.paths.reps, params.rdm.model, CPU)
    assert len(decodes) == 1
    other = {**identity(), "index": {"rows": 48, "sha256": "f" * 64}}
    make_store(tmp_path, ident=other)  # the same values, made from other inputs: its own copy
    killed = tmp_path / "data" / "cache" / f"{decodes[0]}.4242.partial"  # a build killed before its rename
    killed.write_bytes(b"half")
    assert torch.equal(load_store(params.paths.reps, params.rdm.model, CPU).reps, first)
    assert len(decodes) == 2 and decodes[0] != decodes[1]
    assert [p.name for p in (tmp_path / "data" / "cache").glob("*.npy*")] == [decodes[1]]


def test_a_refused_store_leaves_no_copy(tmp_path):
    make_store(tmp_path, nan_at=(37, 1))
    params = micro_params(tmp_path)
    for _ in range(2):  # refused again: nothing was cached that would skip the check
        with pytest.raises(RcgError, match=r"row 37 \(view 1\) holds NaN"):
            load_store(params.paths.reps, params.rdm.model, CPU)
    assert not list((tmp_path / "data" / "cache").glob("*.npy*"))


def test_token_ids_beyond_the_codebook_are_refused_when_decoding(tmp_path):
    write_stores(tmp_path, bad_token=(20, 1, 2, 3))
    params = micro_params(tmp_path)
    for _ in range(2):  # refused again: nothing was cached that would skip the check
        with pytest.raises(RcgError, match="token id 32 outside its 32-code codebook"):
            load_pixel_data(params.paths.tokens, params.paths.reps, "rep", 8, 0, CPU)


def _load_in_child(reps_path, queue) -> None:
    from pipeline.core.config import RdmModel
    store = load_store(reps_path, RdmModel(in_channels=16), CPU)
    queue.put(store.reps.sum().item())


def test_ranks_starting_together_decode_once(tmp_path, monkeypatch):
    """Two processes (two ranks of a node) load at once: one decodes under the lock, the other waits and maps it."""
    import multiprocessing
    import time
    make_store(tmp_path)
    builders = tmp_path / "builders.txt"
    real = mapped._decode

    def slow_decode(*args):
        with open(builders, "a") as f:
            f.write("x")
        time.sleep(0.5)  # long enough for the other process to reach the lock
        real(*args)

    monkeypatch.setattr(mapped, "_decode", slow_decode)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(tmp_path / "data" / "reps.zarr", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    sums = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert builders.read_text() == "x" and sums[0] == sums[1]
    assert all(p.exitcode == 0 for p in procs)
