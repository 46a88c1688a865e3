"""Stage ``train_ssl_judge``: MoCo v3 on the train split with a residual CNN -> ``data/models/ssl_judge.pt``,
``metrics/ssl_judge.json``.

The score space ``ssl_judge`` (pipeline.eval.fidelity): self-supervised, so it needs no labels, and trained with
another architecture and seed (``ssl_judge.seed``) than the conditioning encoder, so RCG was not conditioned on it.
Like the label judge it sees the images as scoring hands them over (uint8 centre crops at views.crop, streamed from
the shards by step-indexed batches: no split is held in memory); the crops and the colour augmentation run on whole
batches. Where the shards have labels, its
k-NN accuracy (val split against the train features, else leave-one-out on the train split) says what its features
know.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model, write_json
from pipeline.core.config import Params
from pipeline.core.progress import progress
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages
from pipeline.data.shards import INDEX_FILE, META_FILE, ShardSet
from pipeline.eval.probes import knn_accuracy
from pipeline.models.moco import TwoCropAugment, momentum_at
from pipeline.models.ssl_judge import MoCoConv, SslJudgeNet, resized_crops
from pipeline.train.batches import StepBatches
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.core.rng import seeded_generator
from pipeline.train.schedules import warmup_cosine

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["views.crop", "ssl_judge"]

STAGE = "train_ssl_judge"


class StepCrops(Dataset):
    """Item ``(idx, k)`` of a :class:`StepBatches` batch: image ``idx``'s uint8 [3, R, R] centre crop."""

    def __init__(self, shards: ShardSet, resolution: int):
        self.images = ShardImages(shards, resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        return self.images[item[0]]


@torch.no_grad()
def features(model: SslJudgeNet, shards: ShardSet, workers: int, device: torch.device, batch: int = 500
             ) -> torch.Tensor:
    """The pooled features [N, feature_dim] of a whole split, streamed ``batch`` centre crops at a time."""
    model.eval()
    loader = DataLoader(ShardImages(shards, model.img_size), batch_size=batch, num_workers=workers)
    return torch.cat([model.features(images.to(device).float().div(255)).cpu()
                      for images in progress(loader, desc=f"ssl_judge: {shards.split} features", unit="batch")])


def knn_metrics(model: SslJudgeNet, shards: ShardSet, params: Params, device: torch.device) -> dict:
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


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    cfg, resolution = params.ssl_judge, params.views.crop
    shards = ShardSet(params.paths.shards, "train")
    config = {"model": {"img_size": resolution, **cfg.model.model_dump()}}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        base = SslJudgeNet(**config["model"])
        moco = MoCoConv(base, cfg.model.proj_hidden_dim, cfg.model.proj_dim, cfg.train.temperature)
    t = cfg.train
    per_epoch = math.ceil(len(shards) / t.batch_size)
    total = t.epochs * per_epoch
    moco.to(device).train()
    opt = torch.optim.AdamW(param_groups(moco, t.weight_decay), lr=t.lr)
    identity = resume_identity(params, PARAMS, shards=shards_identity(params.paths.shards))
    loop = TrainLoop.from_section(STAGE, params, t, d, device, steps=total, identity=identity, modules={"model": moco},
                                  optimizer=opt, lr=warmup_cosine(t.lr, total, per_epoch))
    sampler = StepBatches(len(shards), t.batch_size, cfg.seed, loop.start, total, d.rank, d.world,
                          key="ssl_judge.train.batch_size")
    loader = DataLoader(StepCrops(shards, resolution), batch_sampler=sampler, num_workers=t.workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if t.workers else None)
    augment = TwoCropAugment(resolution, crop_min=t.crop_min, hue=t.hue, grayscale=t.grayscale)
    net = loop.wrap(moco)

    def step(batch: torch.Tensor, it: int) -> dict:
        crops = seeded_generator("cpu", cfg.seed, "ssl_judge.crops", it, d.rank)
        c1, c2 = resized_crops(batch, t.crop_min, crops), resized_crops(batch, t.crop_min, crops)
        x1, x2 = augment.views(c1.to(device), c2.to(device), seeded_generator(device, cfg.seed, "ssl_judge.views", it, d.rank))
        m = momentum_at(it / total, t.momentum)
        return {"loss": net(x1, x2, m), "m": m}

    summary = loop.run(step, loader)
    if not d.is_main:
        d.barrier()
        return summary
    metrics = {**knn_metrics(base, shards, params, device), "num_train": len(shards),
               "resolution": resolution, "feature_dim": base.feature_dim, "epochs": t.epochs, **summary}
    out = params.paths.model_file("ssl_judge")
    save_model("ssl_judge", out, config, base.state_dict(),
                    summary={**metrics, "trained_on": {"index_sha256": file_sha256(params.paths.shards / INDEX_FILE)}})
    write_json(params.paths.metrics / "ssl_judge.json", metrics)
    d.barrier()
    return {"output": str(out), "metrics": str(params.paths.metrics / "ssl_judge.json"),
            **{key: metrics[key] for key in ("knn_top1", "seconds") if key in metrics}}
