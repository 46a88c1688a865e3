"""Stage ``train_judge``: a supervised classifier of the train split -> ``data/models/judge.pt``, ``metrics/judge.json``.

The judge sees the images exactly as scoring hands them to it (centre crops at views.crop, uint8, see
pipeline.data.eval_images), with random flips and small shifts in training. Its val-split accuracy says how much its
features are worth as a yardstick. Trained by the shared loop (AdamW, a one-epoch warm-up then cosine; resumable).
The images stream from the shards: step ``it`` decodes the batch that :class:`pipeline.train.batches.StepBatches`
names (in loader workers), so memory holds a few batches at any split size (ImageNet at 256 px would be ~250 GB
as uint8), and a resumed run, with any worker count, trains on what the killed one would have.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model, write_json
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import log, progress
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages
from pipeline.data.shards import INDEX_FILE, META_FILE, ShardSet
from pipeline.models.judge import Judge, judge_input
from pipeline.train.batches import StepBatches
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.core.rng import seeded_generator
from pipeline.train.schedules import warmup_cosine

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "views.crop", "judge"]

STAGE = "train_judge"


class LabelledCrops(Dataset):
    """Item ``(idx, k)`` of a :class:`StepBatches` batch: image ``idx``'s uint8 [3, R, R] centre crop and its label
    (the augmentation is drawn per batch, from the step, in :func:`train`)."""

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


def train(model: Judge, shards: ShardSet, resolution: int, params: Params, d: Dist, device: torch.device) -> dict:
    """Train ``model`` in place with the shared loop (resumable; step-indexed batches streamed from ``shards`` at
    ``resolution``); returns its summary."""
    cfg = params.judge.train
    per_epoch = math.ceil(len(shards) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    identity = resume_identity(params, PARAMS,
                               shards=shards_identity(params.paths.shards))
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


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    shards = ShardSet(params.paths.shards, "train")
    labels = np.asarray(shards.labels)
    if labels.min() < 0:
        raise RcgError("train_judge: the training images have no labels (a flat folder, or data.labels: none); drop "
                       "judge from score.spaces and score.label_spaces and score in encoder and ssl_judge")
    resolution = params.views.crop
    cfg = params.judge
    if resolution < 2 ** cfg.model.stages:
        raise RcgError(f"judge.model.stages ({cfg.model.stages}) halves views.crop ({resolution} px) below one pixel")
    config = {"model": {"img_size": resolution, "num_classes": int(labels.max()) + 1, **cfg.model.model_dump()}}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(params.seed)
        model = Judge(**config["model"])
    summary = train(model, shards, resolution, params, d, device)
    if not d.is_main:
        d.barrier()
        return summary
    metrics = {"train_accuracy": round(accuracy(model, shards, resolution, cfg.train.workers, device), 4),
               "num_train": len(shards), "num_val": 0, "num_classes": config["model"]["num_classes"],
               "resolution": resolution, "feature_dim": model.feature_dim, **summary}
    splits = json.loads((params.paths.shards / META_FILE).read_text()).get("splits", {})
    if "val" in splits:
        val = ShardSet(params.paths.shards, "val")
        metrics.update(val_accuracy=round(accuracy(model, val, resolution, cfg.train.workers, device), 4),
                       num_val=len(val))
    else:
        log("train_judge: no val split; metrics/judge.json reports the train accuracy only")
    out = params.paths.model_file("judge")
    save_model("judge", out, config, model.state_dict(),
                    summary={**metrics, "trained_on": {"index_sha256": file_sha256(params.paths.shards / INDEX_FILE)}})
    write_json(params.paths.metrics / "judge.json", metrics)
    d.barrier()
    return {"output": str(out), "metrics": str(params.paths.metrics / "judge.json"),
            **{k: metrics[k] for k in ("train_accuracy", "val_accuracy", "seconds") if k in metrics}}
