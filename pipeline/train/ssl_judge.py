"""The ssl_judge's recipe: MoCo v3 (:class:`pipeline.models.ssl_judge.SslJudgeMoCo`, CNN or ViT) on the train split's
centre crops, streamed by step-indexed batches, two random resized crops and the colour augmentation drawn per step
and rank, on the shared loop (AdamW, a one-epoch warm-up then cosine; resumable), under ``ssl_judge.seed``."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.rng import seeded_generator
from pipeline.data.judge_data import StepCrops
from pipeline.data.shards import ShardSet
from pipeline.models.moco import momentum_at
from pipeline.data.augment import TwoCropAugment
from pipeline.models.ssl_judge import SslJudgeMoCo, resized_crops
from pipeline.data.batches import StepBatches
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.train.schedules import warmup_cosine

STAGE = "train_ssl_judge"


def train(moco: SslJudgeMoCo, shards: ShardSet, resolution: int, params: Params, identity: dict, d: Dist,
          device: torch.device) -> dict:
    """Train ``moco`` in place (resumable under ``identity``), at its family's lr; returns the loop's summary."""
    cfg = params.ssl_judge
    t = cfg.train
    lr = t.vit_lr if params.ssl_judge_arch() == "vit" else t.lr
    per_epoch = math.ceil(len(shards) / t.batch_size)
    total = t.epochs * per_epoch
    moco.to(device).train()
    opt = torch.optim.AdamW(param_groups(moco, t.weight_decay), lr=lr)
    loop = TrainLoop.from_section(STAGE, params, t, d, device, steps=total, identity=identity, modules={"model": moco},
                                  optimizer=opt, lr=warmup_cosine(lr, total, per_epoch))
    sampler = StepBatches(len(shards), t.batch_size, cfg.seed, loop.start, total, d.rank, d.world,
                          key="ssl_judge.train.batch_size")
    loader = DataLoader(StepCrops(shards, resolution), batch_sampler=sampler, num_workers=t.workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if t.workers else None)
    augment = TwoCropAugment(resolution, crop_min=t.crop_min, hue=t.hue, grayscale=t.grayscale)
    net = loop.wrap(moco)

    def step(batch: torch.Tensor, it: int) -> dict:
        crops = seeded_generator("cpu", cfg.seed, "ssl_judge.crops", it, d.rank)
        c1, c2 = resized_crops(batch, t.crop_min, crops), resized_crops(batch, t.crop_min, crops)
        views = seeded_generator(device, cfg.seed, "ssl_judge.views", it, d.rank)
        x1, x2 = augment.views(c1.to(device), c2.to(device), views)
        m = momentum_at(it / total, t.momentum)
        return {"loss": net(x1, x2, m), "m": m}

    return loop.run(step, loader)
