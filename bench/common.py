"""Helpers shared by the benchmarks: the CIFAR-10 folder from ../shared/datasets, unpacked once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def cifar10(root: Path = Path("/tmp/cifar10")) -> Path:
    """Unpack CIFAR-10 (ImageNet layout) into ``root`` if not there yet; returns the folder with train/ and test/."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "-xf", str(SHARED / f"{split}.tar"), "-C", str(root)], check=True)
    return root


def run_stage(name: str, params: Any, root: Path, item: str | None = None) -> dict:
    """Run a stage as a user does (``rcg <stage> [ITEM] --params``, in a fresh process, params written to ``root``)
    and return the summary it prints: a benchmark measures the stage without importing ``stages``."""
    import yaml

    params_file = root / f"params-{name}.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "stages.cli", name.replace("_", "-"), *([item] if item else []),
                          "--params", str(params_file)],
                         check=True, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout)


def builtin_shards(root: Path, images: int, overrides: list[str]) -> list[str]:
    """Shard ``images`` built-in train images (no val) under ``root``; returns the params overrides that
    point a stage at them (``overrides`` appended)."""
    from pipeline.core.config import load_params

    overrides = [f"paths.data={root}/data", f"paths.metrics={root}/metrics", f"data.builtin.num_train={images}",
                 "data.builtin.num_val=0", *overrides]
    run_stage("shard", load_params(None, overrides), root)
    return overrides


def images_per_s(fn: Callable[[Any], Any], views: Any, batches: int) -> float:
    """Rate of ``fn`` on one ready batch of ``views`` (uint8 [B, V, H, W, 3]), after one warm-up call."""
    fn(views)
    start = time.perf_counter()
    for _ in range(batches):
        fn(views)
    return batches * len(views) / (time.perf_counter() - start)
