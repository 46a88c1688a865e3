"""Resumable training state and curves for dvc plots (pipeline.train.loop drives both).

Resume state (model, optimizer, EMA, step, RNG) lives in ``data/state/<stage>.pt`` beside the DVC outputs,
so it survives ``dvc repro`` deleting them; it is used only if it was written under the same resume identity
(pipeline.train.identity).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import torch

from pipeline.core.artifacts import load_checkpoint, save_torch
from pipeline.core.errors import RcgError
from pipeline.core.progress import log


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainState:
    """Save/restore everything needed to continue a killed run exactly where it stopped."""

    def __init__(self, path: Path, config: dict):
        self.path, self.config, self.config_hash = Path(path), config, config_hash(config)

    def save(self, step: int, modules: dict[str, object], extra: dict | None = None) -> None:
        state = {"step": step, "config_hash": self.config_hash, "torch_rng": torch.get_rng_state(),
                 "config": json.dumps(self.config, sort_keys=True, default=str),
                 "modules": {name: m.state_dict() for name, m in modules.items()}, "extra": extra or {}}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        save_torch(state, self.path)

    def load(self, modules: dict[str, object]) -> tuple[int, dict]:
        """Restore into ``modules`` and return (step, extra); (0, {}) when there is nothing to resume."""
        if not self.path.is_file():
            return 0, {}
        state = load_checkpoint(self.path)
        if state.get("config_hash") != self.config_hash:
            log(f"ignoring {self.path}: it was written for other inputs or params "
                f"({', '.join(self._differences(state.get('config')))}); starting from step 0")
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


    def _differences(self, saved: str | None) -> list[str]:
        """The flattened keys on which a saved identity differs from ours (for the message only)."""
        def flat(tree, prefix=""):
            if not isinstance(tree, dict):
                return {prefix: tree}
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        ours, theirs = flat(json.loads(json.dumps(self.config, default=str))), flat(json.loads(saved or "{}"))
        return [k.rstrip(".") for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)][:4] or ["?"]


class CurveLog:
    """Training curves as CSV (``dvc plots show`` renders them). The file is rewritten from ``rows``, the logged rows
    the train state carries, rather than read back: ``dvc repro`` deletes a stage's outputs before it reruns it, so
    a resumed (or already finished) run must restore its curve from the state, not from the file."""

    def __init__(self, path: Path, fields: list[str], rows: list[dict] = ()):
        self.path, self.fields = Path(path), ["step", *fields]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(self._formatted(row) for row in rows)

    @staticmethod
    def _formatted(row: dict) -> dict:
        return {k: v if k == "step" else f"{v:.6g}" for k, v in row.items()}

    def add(self, step: int, **values: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(self._formatted({"step": step, **values}))
