"""The encoder's recipe: MoCo v3 pretraining (:class:`pipeline.models.moco.MoCoV3` around our ViT or ResNet) on the train
split, two random-resized crops per image (:mod:`pipeline.data.encoder_data`) and the colour augmentation drawn per
step and rank, on the shared loop (AdamW, warm-up then cosine, the momentum schedule; resumable)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.progress import log
from pipeline.core.rng import seeded_generator
from pipeline.data.encoder_data import TwoCropDataset
from pipeline.data.shards import ShardSet
from pipeline.models.encoder import build_encoder
from pipeline.models.moco import MoCoV3, momentum_at
from pipeline.data.augment import TwoCropAugment
from pipeline.data.batches import StepBatches
from pipeline.train.loop import TrainLoop
from pipeline.train.schedules import warmup_cosine

STAGE = "pretrain_encoder"


def pretrain(params: Params, shards: ShardSet, identity: dict, d: Dist,
             device: torch.device) -> tuple[MoCoV3, dict]:
    """(the trained MoCo v3 model, its summary: the loop's, epochs, world, lr); resumable under ``identity``."""
    p, config = params.encoder.train, params.encoder.model.model_dump()
    cuda = device.type == "cuda"
    steps_per_epoch = len(shards) // p.batch_size
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    base_lr = p.blr * p.batch_size / 256  # MoCo v3 rule, on the global batch

    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = MoCoV3(build_encoder(config), dim=config["proj_dim"], mlp_dim=config["proj_hidden_dim"], T=p.temperature)
    if d.world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif d.world > 1:
        log("pretrain_encoder: SyncBatchNorm needs GPUs; under gloo each rank's BN uses its own batch statistics")
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=base_lr,
                                  weight_decay=p.weight_decay, fused=cuda)
    loop = TrainLoop.from_section(STAGE, params, p, d, device, steps=total, identity=identity, modules={"model": model},
                                  optimizer=optimizer, lr=warmup_cosine(base_lr, total, warmup))
    sampler = StepBatches(len(shards), p.batch_size, params.seed, loop.start, total, d.rank, d.world,
                          key="encoder.train.batch_size")
    augment = TwoCropAugment(config["img_size"], crop_min=p.crop_min, hue=p.hue, grayscale=p.grayscale)
    loader = DataLoader(TwoCropDataset(shards, augment, params.seed),
                        batch_sampler=sampler, num_workers=p.workers, pin_memory=cuda,
                        prefetch_factor=4 if p.workers else None)
    net = loop.wrap(model)

    def step(batch: tuple[torch.Tensor, torch.Tensor], it: int) -> dict:
        m = momentum_at(it / total, p.momentum)
        crops1, crops2 = (x.to(device, non_blocking=True) for x in batch)
        x1, x2 = augment.views(crops1, crops2, seeded_generator(device, params.seed, "encoder.views", it, d.rank))
        return {"loss": net(x1, x2, m), "m": m}

    result = loop.run(step, loader)
    return model, {"source": "pretrained", "epochs": p.epochs, **result, "world": d.world, "lr": base_lr}
