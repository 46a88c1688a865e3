"""The real images that scoring compares samples with, and that the judge learns from: centre crops at one size.

Every feature extractor of pipeline.eval.fidelity sees reference images and samples the same way, as uint8
[3, R, R] tensors decoded straight from the shards (never re-saved, so never through a lossy file).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.images import decode_rgb
from pipeline.data.shards import ShardSet
from pipeline.data.views import ViewRecipe, make_view


def centre_crop(data: bytes, resolution: int) -> np.ndarray:
    """Stored image bytes -> uint8 [R, R, 3]: the short side resized to R (bicubic), then the centre crop --
    view 0 of pipeline.data.views at R (Resize(R) + CenterCrop(R), the evaluation protocol's reference)."""
    recipe = ViewRecipe(count=1, resize=resolution, crop=resolution, flip=False)
    return make_view(decode_rgb(data), "", 0, recipe)


class ShardImages(Dataset):
    """Rows of a shard split as torch-fidelity input items: uint8 [3, R, R] centre crops."""

    def __init__(self, shards: ShardSet, resolution: int, rows: np.ndarray | None = None):
        self.shards, self.resolution = shards, resolution
        self.rows = np.arange(len(shards)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = centre_crop(self.shards.read(int(self.rows[i])), self.resolution)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # a writable copy


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """``count`` rows spread over ``range(n)`` (every class of a sorted folder); count 0 or >= n: all rows."""
    if count == 0 or count >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
