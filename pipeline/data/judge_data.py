"""The judges' training images, streamed from the shards as scoring hands them over (uint8 centre crops,
:mod:`pipeline.data.eval_images`): labelled for the label judge, with its augmentation (a random flip and a small
shift, drawn per step), unlabelled for the ssl_judge (whose crops and colour augmentation run on whole batches)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pipeline.data.eval_images import ShardImages
from pipeline.data.shards import ShardSet


class LabelledCrops(Dataset):
    """Item ``(idx, k)`` of a :class:`pipeline.data.batches.StepBatches` batch: image ``idx``'s uint8 [3, R, R]
    centre crop and its label
    (the augmentation is drawn per batch, from the step, in :func:`pipeline.train.judge.train`)."""

    def __init__(self, shards: ShardSet, resolution: int):
        self.images, self.labels = ShardImages(shards, resolution), shards.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        idx, _ = item
        return self.images[idx], int(self.labels[idx])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to R/8 pixels (reflect padding), per image."""
    b, _, r, _ = x.shape
    pad = max(1, r // 8)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + r, dx[i]:dx[i] + r] for i in range(b)]).to(torch.uint8)


class StepCrops(Dataset):
    """Item ``(idx, k)`` of a :class:`pipeline.data.batches.StepBatches` batch: image ``idx``'s uint8 [3, R, R]
    centre crop."""

    def __init__(self, shards: ShardSet, resolution: int):
        self.images = ShardImages(shards, resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        return self.images[item[0]]
