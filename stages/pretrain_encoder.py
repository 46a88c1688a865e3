"""Stage ``pretrain_encoder``: ``data/models/encoder.pt``, the frozen encoder every later stage reads.

With ``encoder.checkpoint`` set, the official MoCo v3 file is imported and must be the architecture
``encoder.model`` names. Without one, MoCo v3 trains an encoder on the shards. Either way the file holds what RCG
keeps of MoCo v3, the base encoder with its projector, in the "rcg-encoder" format.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model_file
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.models.encoder import MODEL_FORMAT, MoCoViT, load_encoder_as
from pipeline.core.errors import RcgError
from pipeline.data.images import decode_rgb
from pipeline.models.moco import MoCoV3, TwoCropAugment, momentum_at
from pipeline.core.progress import log, progress
from pipeline.core.runtime import device_for
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.train.state import CurveLog, TrainState, check_finite, cosine_lr, seed_everything, set_lr


class TwoCropDataset(Dataset):
    """Image ``idx`` as MoCo v3's two augmented views.

    The random-resized crop works on the stored image as it is, like MoCo v3 on the original file: crop
    scales are fractions of the image area, so a pre-resize to ``views.resize`` would only add a second
    interpolation, and it would make this stage depend on ``views``, which its dvc params do not list.
    """

    def __init__(self, shards: ShardSet, augment: TwoCropAugment):
        self.shards, self.augment = shards, augment

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(decode_rgb(self.shards.read(idx)))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation randomness of one rank's epoch, a function of (seed, epoch, rank) alone: ranks differ, and
    resuming needs no per-rank RNG state."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def import_official(params: Params) -> dict:
    path, config = params.encoder.checkpoint, params.encoder.model.model_dump()
    model = load_encoder_as(path, config)
    summary = {"source": "official", "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    out = params.paths.models / "encoder.pt"
    save_model_file(out, MODEL_FORMAT, {"model": config}, model.state_dict(), summary=summary)
    return {"output": str(out), **summary}


def pretrain(params: Params, d: Dist) -> dict:
    p, config = params.pretrain_encoder, params.encoder.model.model_dump()
    device = device_for(params.runtime, d.local_rank)
    cuda = device.type == "cuda"
    seed_everything(params.seed)  # the same initial weights on every rank

    shards = ShardSet(params.paths.shards, "train")
    dataset = TwoCropDataset(shards, TwoCropAugment(config["img_size"], crop_min=p.crop_min))
    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=params.seed,
                                 drop_last=True)
    # Fresh workers each epoch, seeded from the epoch's seed (below): a resumed run draws the same augmentations.
    loader = DataLoader(dataset, batch_size=p.batch_size, sampler=sampler, num_workers=p.workers, drop_last=True,
                        pin_memory=cuda, persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise RcgError(f"pretrain_encoder.batch_size ({p.batch_size}) x {d.world} rank(s) exceeds the "
                       f"{len(dataset)} training images")
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    base_lr = p.blr * p.batch_size * d.world / 256  # MoCo v3 rule, on the global batch

    model = MoCoV3(MoCoViT(**config), dim=config["proj_dim"], mlp_dim=config["proj_hidden_dim"], T=p.temperature)
    if d.world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif d.world > 1:
        log("pretrain_encoder: SyncBatchNorm needs GPUs; under gloo each rank's BN uses its own batch statistics")
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=base_lr,
                                  weight_decay=p.weight_decay, fused=cuda)
    resume_config = {"seed": params.seed, "encoder": params.section("encoder"), "world": d.world,
                     "pretrain_encoder": {k: v for k, v in params.section("pretrain_encoder").items()
                                          if k not in ("workers", "log_every")},
                     "index_sha256": file_sha256(params.paths.shards / INDEX_FILE)}
    state = TrainState(params.paths.state / "pretrain_encoder.pt", resume_config)
    step, extra = state.load({"model": model, "optimizer": optimizer})
    net = DistributedDataParallel(model, device_ids=[d.local_rank] if cuda else None) if d.world > 1 else model
    curve = CurveLog(params.paths.plots / "pretrain_encoder.csv", ["loss", "lr", "m"], step) if d.is_main else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if p.bf16 and cuda else contextlib.nullcontext()

    seconds, loss_value = extra.get("seconds", 0.0), extra.get("loss", float("nan"))
    start = time.perf_counter()
    bar = progress(total=total, desc="pretrain_encoder", unit="step")
    bar.update(step)
    for epoch in range(step // steps_per_epoch, p.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(params.seed, epoch, d.rank))
        for x1, x2 in loader:
            lr = cosine_lr(step, total, base_lr, warmup)
            set_lr(optimizer, lr)
            m = momentum_at(step / total, p.momentum)
            with amp:
                loss = net(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True), m)
            check_finite(loss, step, "pretrain_encoder", state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if step % p.log_every == 0 or step == total:
                loss_value = distributed.all_mean(loss.item(), d, device)
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
                if curve is not None:
                    curve.add(step, loss=loss_value, lr=lr, m=m)
        elapsed = seconds + time.perf_counter() - start
        if d.is_main:
            state.save(step, {"model": model, "optimizer": optimizer}, {"seconds": elapsed, "loss": loss_value})
    bar.close()
    seconds += time.perf_counter() - start

    out = params.paths.models / "encoder.pt"
    summary = {"source": "pretrained", "epochs": p.epochs, "steps": total, "final_loss": round(loss_value, 6),
               "seconds": round(seconds, 1), "world": d.world, "global_batch": p.batch_size * d.world,
               "lr": base_lr}
    if d.is_main:
        save_model_file(out, MODEL_FORMAT, {"model": config}, model.base_encoder.state_dict(), summary=summary)
    d.barrier()
    return {"output": str(out), **summary}


def run(params: Params) -> dict:
    d = distributed.init()
    if params.encoder.checkpoint is None:
        return pretrain(params, d)
    summary = import_official(params) if d.is_main else {}
    d.barrier()
    return summary
