"""What every training stage shares: seeding, LR schedules, resumable training state, curves for dvc plots.

Resume state (model, optimizer, EMA, step, RNG) lives in ``data/state/<stage>.pt`` beside the DVC outputs,
so it survives ``dvc repro`` deleting them; it is used only if it was written with the same config.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.core.artifacts import atomic_file, load_checkpoint
from pipeline.core.errors import RcgError
from pipeline.core.progress import log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cycle cosine to ``min_lr`` (MAE/MAGE/MoCo v3 schedule)."""
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers, whose state_dict has clean keys."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class TrainState:
    """Save/restore everything needed to continue a killed run exactly where it stopped."""

    def __init__(self, path: Path, config: dict):
        self.path, self.config_hash = Path(path), config_hash(config)

    def save(self, step: int, modules: dict[str, object], extra: dict | None = None) -> None:
        state = {"step": step, "config_hash": self.config_hash, "torch_rng": torch.get_rng_state(),
                 "modules": {name: m.state_dict() for name, m in modules.items()}, "extra": extra or {}}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        with atomic_file(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, modules: dict[str, object]) -> tuple[int, dict]:
        """Restore into ``modules`` and return (step, extra); (0, {}) when there is nothing to resume."""
        if not self.path.is_file():
            return 0, {}
        state = load_checkpoint(self.path)
        if state.get("config_hash") != self.config_hash:
            log(f"ignoring {self.path}: it was written with another config; starting from step 0")
            return 0, {}
        for name, module in modules.items():
            if name not in state["modules"]:
                raise RcgError(f"{self.path}: no saved state for {name!r}; delete the file to start over")
            module.load_state_dict(state["modules"][name])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        log(f"resuming from {self.path} at step {state['step']}")
        return state["step"], state["extra"]


class CurveLog:
    """Training curves as CSV (``dvc plots show`` renders them); rewritten consistently on resume."""

    def __init__(self, path: Path, fields: list[str], resume_step: int = 0):
        self.path, self.fields = Path(path), ["step", *fields]
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def add(self, step: int, **values: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})


def check_finite(loss: torch.Tensor, step: int, what: str, state: TrainState) -> None:
    """Stop on NaN/Inf, naming the step; the last good checkpoint in ``state`` is left untouched."""
    if not torch.isfinite(loss).all():
        raise RcgError(f"{what}: non-finite loss ({loss.item()}) at step {step}; training stopped, the last good "
                       f"state is kept in {state.path} (lower the learning rate or check the inputs)")
