"""Helpers shared by the benchmarks: the CIFAR-10 folder from ../shared/datasets, unpacked once."""

from __future__ import annotations

import subprocess
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def cifar10(root: Path = Path("/tmp/cifar10")) -> Path:
    """Unpack CIFAR-10 (ImageNet layout) into ``root`` if not there yet; returns the folder with train/ and test/."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "-xf", str(SHARED / f"{split}.tar"), "-C", str(root)], check=True)
    return root
