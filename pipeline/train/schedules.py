"""Per-iteration learning-rate schedules: a function of the iteration ``it`` (updates done before it) alone, so a
resumed run sets exactly the lr the uninterrupted one did."""

from __future__ import annotations

import math
from typing import Callable

import torch

Schedule = Callable[[int], float]


def cosine_lr(it: int, total: int, base_lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cycle cosine to ``min_lr`` (MAE/MAGE/MoCo v3 schedule)."""
    if it < warmup:
        return base_lr * it / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(base_lr: float, total: int, warmup: int = 0, min_lr: float = 0.0) -> Schedule:
    return lambda it: cosine_lr(it, total, base_lr, warmup, min_lr)


def warmup_constant(base_lr: float, warmup: int = 0) -> Schedule:
    """Linear warm-up from 0 over ``warmup`` iterations, then ``base_lr`` (the official RDM: no warm-up)."""
    return lambda it: base_lr * min(1.0, it / warmup) if warmup else base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group gets ``lr`` times its ``lr_scale`` (1 when absent: layer-wise decay can set it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
