"""Run-time settings that do not change results' meaning: device choice, thread count, bf16 where it is native."""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

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


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX-BF16): there oneDNN runs bf16 matmuls
    2-4x faster than fp32 (bench/RESULTS.md, "bf16 on the CPU"). Elsewhere bf16 is emulated and slower, so a
    stage's ``bf16: true`` stays fp32 on such a CPU (the stores and sample stores record which ran)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def uses_bf16(asked: bool, device: torch.device) -> bool:
    """Whether a stage that asked for bf16 runs it on ``device``: CUDA always, a CPU where bf16 is native."""
    return asked and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()))


def precision(asked: bool, device: torch.device) -> str:
    return "bf16" if uses_bf16(asked, device) else "fp32"


def autocast(asked: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when :func:`uses_bf16`, else nothing (exact fp32)."""
    if uses_bf16(asked, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
