"""What the judges' features know: the label judge's accuracy on a whole split, the ssl_judge's k-NN accuracy
where the shards have labels."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.core.config import Params
from pipeline.core.progress import progress
from pipeline.data.eval_images import ShardImages
from pipeline.data.shards import META_FILE, ShardSet
from pipeline.eval.probes import knn_accuracy
from pipeline.models.judge import Judge, judge_input
from pipeline.models.ssl_judge import SslJudgeBase


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


@torch.no_grad()
def features(model: SslJudgeBase, shards: ShardSet, workers: int, device: torch.device, batch: int = 500
             ) -> torch.Tensor:
    """The pooled features [N, feature_dim] of a whole split, streamed ``batch`` centre crops at a time."""
    model.eval()
    loader = DataLoader(ShardImages(shards, model.img_size), batch_size=batch, num_workers=workers)
    return torch.cat([model.features(images.to(device).float().div(255)).cpu()
                      for images in progress(loader, desc=f"ssl_judge: {shards.split} features", unit="batch")])


def knn_metrics(model: SslJudgeBase, shards: ShardSet, params: Params, device: torch.device) -> dict:
    """k-NN accuracy of the features where the train split has labels: the val split's images against the train
    split's features when there is a labelled val split, else leave-one-out on the train split."""
    labels, workers = np.asarray(shards.labels), params.ssl_judge.train.workers
    if labels.min() < 0:
        return {"labelled": False}
    k, train = params.ssl_judge.knn_k, features(model, shards, workers, device)
    splits = json.loads((params.paths.shards / META_FILE).read_text()).get("splits", {})
    if "val" in splits:
        val = ShardSet(params.paths.shards, "val")
        if val.labels.min() >= 0:
            queries = features(model, val, workers, device)
            return {"labelled": True, "knn_k": k, "knn_split": "val", "knn_top1": round(
                knn_accuracy(train, labels, k, queries=queries, query_labels=val.labels), 4)}
    return {"labelled": True, "knn_k": k, "knn_split": "train", "knn_top1": round(knn_accuracy(train, labels, k), 4)}
