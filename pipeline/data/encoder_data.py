"""The encoder's pretraining images: MoCo v3's two random-resized crops of each image, streamed from the shards."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from pipeline.core.rng import seeded_numpy
from pipeline.data.images import decode_rgb
from pipeline.data.shards import ShardSet
from pipeline.data.augment import TwoCropAugment


class TwoCropDataset(Dataset):
    """Item ``(idx, k)``: image ``idx`` as MoCo v3's two random-resized crops (uint8), drawn from the stream
    (seed, "encoder.crops", k) of the global sample position k, so a resumed run (any worker count) draws the crops it
    would have drawn; the rest of the augmentation runs on the batch (``TwoCropAugment.views``).

    The random-resized crop works on the stored image as it is, like MoCo v3 on the original file: crop
    scales are fractions of the image area, so a pre-resize to ``views.resize`` would only add a second
    interpolation, and it would make this stage depend on ``views``, which its dvc params do not list.
    """

    def __init__(self, shards: ShardSet, augment: TwoCropAugment, seed: int):
        self.shards, self.augment, self.seed = shards, augment, seed

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, k = item
        return self.augment.crops(decode_rgb(self.shards.read(idx)), seeded_numpy(self.seed, "encoder.crops", k))
