"""A 1-process ``torchrun`` through a process group (NCCL on a GPU, gloo on the CPU): init, all-reduce, a DDP
backward, barrier, destroy. Part of ``bench/gpu_check.py``; a module of its own so that the rank it launches
imports torch alone.

    python -m bench.ddp_check [--backend nccl|gloo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]


def worker(out: Path, backend: str) -> None:
    """One torchrun rank: join, all-reduce, a DDP backward, barrier, leave; the timings and checks into ``out``."""
    tic = time.perf_counter()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    init_s = time.perf_counter() - tic
    x = torch.full((1 << 20,), float(rank + 1), device=device)
    tdist.all_reduce(x)
    reduced = bool((x == world * (world + 1) / 2).all())
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Linear(64, 64).to(device),
                                              device_ids=[local_rank] if device.type == "cuda" else None)
    net(torch.ones(8, 64, device=device)).sum().backward()
    grad_ok = bool(torch.isfinite(net.module.weight.grad).all())
    tdist.barrier()
    tdist.destroy_process_group()
    if rank == 0:
        out.write_text(json.dumps({"backend": backend, "world": world, "init_s": round(init_s, 3),
                                   "all_reduce_ok": reduced, "ddp_backward_ok": grad_ok,
                                   "seconds": round(time.perf_counter() - tic, 3)}))


def check_ddp(backend: str, timeout_s: int = 300) -> dict:
    """Launch :func:`worker` under ``torchrun --standalone --nproc-per-node 1``; ``ok`` when it exited cleanly
    with both checks passed, else ``error`` holds its last line of stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        tic = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                              "-m", "bench.ddp_check", "--worker", str(out), "--backend", backend],
                             cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        result = json.loads(out.read_text()) if out.is_file() else {"backend": backend}
    result["launch_s"] = round(time.perf_counter() - tic, 2)
    result["ok"] = run.returncode == 0 and result.get("all_reduce_ok", False) and result.get("ddp_backward_ok", False)
    if run.returncode:
        result["error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["nccl", "gloo"], default="nccl" if torch.cuda.is_available() else "gloo")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.backend)
        return
    result = check_ddp(args.backend)
    print(json.dumps(result))
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
