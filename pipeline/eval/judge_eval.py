"""The judge's accuracy on a whole split (how much its features are worth as a yardstick)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from pipeline.core.progress import progress
from pipeline.data.eval_images import ShardImages
from pipeline.data.shards import ShardSet
from pipeline.models.judge import Judge, judge_input


@torch.no_grad()
def accuracy(model: Judge, shards: ShardSet, resolution: int, workers: int, device: torch.device,
             batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on a whole split, streamed ``batch`` images at a time."""
    model.eval()
    loader = DataLoader(ShardImages(shards, resolution), batch_size=batch, num_workers=workers)
    labels = torch.as_tensor(shards.labels, dtype=torch.long)
    correct = 0
    for i, images in enumerate(progress(loader, desc=f"judge: {shards.split} accuracy", unit="batch")):
        predicted = model(judge_input(images.to(device), model.img_size)).argmax(1).cpu()
        correct += (predicted == labels[i * batch:i * batch + len(images)]).sum().item()
    return correct / len(shards)
