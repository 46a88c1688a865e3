"""Stage ``pretrain_encoder``: ``data/models/encoder.pt``, the frozen encoder every later stage reads.

With ``encoder.checkpoint`` set, the official MoCo v3 file is imported and must be the architecture
``encoder.model`` names; the curve ``metrics/plots/pretrain_encoder.csv`` is then a header alone (nothing
trained). Without one, MoCo v3 trains an encoder on the shards. Either way the file holds what RCG
keeps of MoCo v3, the base encoder with its projector, in the "rcg-encoder" format.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import require_file
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.data.images import decode_rgb
from pipeline.data.shards import ShardSet
from pipeline.models.encoder import MoCoViT
from pipeline.models.official.encoder import load_encoder_as
from pipeline.models.moco import MoCoV3, TwoCropAugment, momentum_at
from pipeline.train.batches import StepBatches
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.loop import TrainLoop
from pipeline.core.rng import seeded_generator, seeded_numpy
from pipeline.train.schedules import warmup_cosine
from pipeline.train.state import CurveLog

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "encoder"]

STAGE = "pretrain_encoder"


class TwoCropDataset(Dataset):
    """Item ``(idx, k)``: image ``idx`` as MoCo v3's two random-resized crops (uint8), drawn from the stream
    (seed, CROPS, k) of the global sample position k, so a resumed run (any worker count) draws the crops it
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


def import_official(params: Params) -> dict:
    path, config = params.encoder.checkpoint, params.encoder.model.model_dump()
    model = load_encoder_as(path, config)
    summary = {"source": "official", "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    out = params.paths.model_file("encoder")
    save_model("encoder", out, {"model": config}, model.state_dict(), summary=summary)
    CurveLog(params.paths.plots / f"{STAGE}.csv", [])  # what dvc.yaml declares; no training rows
    return {"output": str(out), **summary}


def pretrain(params: Params, d: Dist) -> dict:
    p, config = params.encoder.train, params.encoder.model.model_dump()
    device = device_for(params.runtime, d.local_rank)
    cuda = device.type == "cuda"
    shards = ShardSet(params.paths.shards, "train")
    steps_per_epoch = len(shards) // p.batch_size
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    base_lr = p.blr * p.batch_size / 256  # MoCo v3 rule, on the global batch

    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = MoCoV3(MoCoViT(**config), dim=config["proj_dim"], mlp_dim=config["proj_hidden_dim"], T=p.temperature)
    if d.world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif d.world > 1:
        log("pretrain_encoder: SyncBatchNorm needs GPUs; under gloo each rank's BN uses its own batch statistics")
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=base_lr,
                                  weight_decay=p.weight_decay, fused=cuda)
    identity = resume_identity(params, PARAMS,
                               shards=shards_identity(params.paths.shards))
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
    out = params.paths.model_file("encoder")
    summary = {"source": "pretrained", "epochs": p.epochs, **result, "world": d.world, "lr": base_lr}
    if d.is_main:
        save_model("encoder", out, {"model": config}, model.base_encoder.state_dict(), summary=summary)
    d.barrier()
    return {"output": str(out), **summary}


def run(params: Params) -> dict:
    require_file(params.encoder.checkpoint, "encoder.checkpoint")
    d = distributed.init(params.runtime)
    if params.encoder.checkpoint is None:
        return pretrain(params, d)
    summary = import_official(params) if d.is_main else {}
    d.barrier()
    return summary
