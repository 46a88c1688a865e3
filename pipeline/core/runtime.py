"""Run-time settings that do not change results' meaning: device choice and thread count."""

from __future__ import annotations

import torch

from pipeline.core.config import Runtime
from pipeline.core.errors import RcgError


def configure(runtime: Runtime) -> None:
    if runtime.threads:
        torch.set_num_threads(runtime.threads)


def device_for(runtime: Runtime, local_rank: int = 0) -> torch.device:
    if runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RcgError("runtime.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
