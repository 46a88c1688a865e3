"""The judge's recipe: a supervised classifier of the train split on the shared loop (AdamW, a one-epoch warm-up
then cosine, label smoothing; resumable). Step ``it`` decodes the batch that
:class:`pipeline.data.batches.StepBatches` names (in loader workers), so memory holds a few batches at any split
size, and a resumed run, with any worker count, trains on what the killed one would have."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.rng import seeded_generator
from pipeline.data.judge_data import LabelledCrops, augment
from pipeline.data.shards import ShardSet
from pipeline.models.judge import Judge, judge_input
from pipeline.data.batches import StepBatches
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.train.schedules import warmup_cosine

STAGE = "train_judge"


def train(model: Judge, shards: ShardSet, resolution: int, params: Params, identity: dict, d: Dist,
          device: torch.device) -> dict:
    """Train ``model`` in place with the shared loop (resumable under ``identity``; step-indexed batches streamed
    from ``shards`` at ``resolution``); returns its summary."""
    cfg = params.judge.train
    per_epoch = math.ceil(len(shards) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    loop = TrainLoop.from_section(STAGE, params, cfg, d, device, steps=total, identity=identity,
                                  modules={"model": model}, optimizer=opt, lr=warmup_cosine(cfg.lr, total, per_epoch))
    sampler = StepBatches(len(shards), cfg.batch_size, params.seed, loop.start, total, d.rank, d.world,
                          key="judge.train.batch_size")
    loader = DataLoader(LabelledCrops(shards, resolution), batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None)
    net = loop.wrap(model)

    def step(batch: tuple[torch.Tensor, torch.Tensor], it: int) -> dict:
        images, labels = batch
        x = augment(images, seeded_generator("cpu", params.seed, "judge.augment", it, d.rank))
        logits = net(judge_input(x.to(device), model.img_size))
        return {"loss": F.cross_entropy(logits, labels.to(device), label_smoothing=cfg.label_smoothing)}

    return {**loop.run(step, loader), "epochs": cfg.epochs}
