"""One CPU, one GPU or many under ``torchrun``: the same code, with rank/world read from the environment.

The backend follows the device the stage computes on (``runtime.device``): NCCL for CUDA, gloo for the CPU, so a
CPU run on a GPU machine still works. Barriers, where ranks wait while rank 0 works alone (the k-NN probe, the
RDM eval, figures, accuracy passes), run on a CPU (gloo) group with ``runtime.barrier_timeout_minutes``: NCCL's
watchdog, which aborts a collective after its own 10 minutes, never sees those waits. :func:`stage_scope` tears
the group down when a stage ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from pipeline.core.config import Runtime
from pipeline.core.runtime import device_for


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    barrier_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)  # None: the default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.barrier_group)


_barrier_group: dist.ProcessGroup | None = None  # made with the NCCL group it serves, gone with it


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(runtime: Runtime) -> Dist:
    """Join the process group when launched by torchrun, on the backend of the device ``runtime`` picks for this
    rank; a no-op in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    global _barrier_group
    if not dist.is_initialized():
        device = device_for(runtime, local_rank)
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(device)
        barrier_timeout = timedelta(minutes=runtime.barrier_timeout_minutes)
        # gloo's one group also carries the barriers and gets their timeout; NCCL keeps its default
        dist.init_process_group(backend, timeout=barrier_timeout if backend == "gloo" else None)
        _barrier_group = dist.new_group(backend="gloo", timeout=barrier_timeout) if backend == "nccl" else None
    return Dist(rank, world, local_rank, _barrier_group)


@contextlib.contextmanager
def stage_scope() -> Iterator[None]:
    """Run a stage; destroy the process group it joined (if any) when it returns or raises, so that no rank
    leaves a communicator or a gloo socket behind for the next stage or the launcher to trip on."""
    global _barrier_group
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _barrier_group = None
