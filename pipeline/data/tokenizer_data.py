"""The tokenizer's training images: random crops streamed from the shards (taming's rescaler, then a random square and
a coin-flip mirror drawn from the global sample position)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.rng import seeded_numpy
from pipeline.data.images import decode_rgb, resize_short_side
from pipeline.data.shards import ShardSet


class RandomCrops(Dataset):
    """Item ``(idx, k)``: image ``idx`` with its short side resized to ``crop`` (taming's rescaler), then a random
    ``crop`` square and a coin-flip mirror drawn from (seed, k). uint8 [crop, crop, 3]."""

    def __init__(self, shards: ShardSet, crop: int, seed: int):
        self.shards, self.crop, self.seed = shards, crop, seed

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        idx, k = item
        img = resize_short_side(decode_rgb(self.shards.read(idx)), self.crop)
        rng = seeded_numpy(self.seed, "tokenizer.crops", k)
        w, h = img.size
        left, top = int(rng.integers(w - self.crop + 1)), int(rng.integers(h - self.crop + 1))
        out = np.asarray(img.crop((left, top, left + self.crop, top + self.crop)))
        if rng.integers(2):
            out = out[:, ::-1]
        return torch.from_numpy(out.copy())
