"""Stage ``train_judge``: a supervised classifier of the train split -> ``data/models/judge.pt``, ``metrics/judge.json``.

The judge sees the images exactly as scoring hands them to it (centre crops at views.crop, uint8, see
pipeline.data.eval_images), with random flips and small shifts in training. Its val-split accuracy says how much its
features are worth as a yardstick. Trained by the shared loop (AdamW, a one-epoch warm-up then cosine; resumable);
the whole train split sits in memory as uint8, which suits a judge of small images (ImageNet-scale runs score
with Inception instead).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model_file, write_json
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import log, progress
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages
from pipeline.data.shards import INDEX_FILE, META_FILE, ShardSet
from pipeline.models.judge import MODEL_FORMAT, Judge, judge_input
from pipeline.train.batches import StepBatches
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.train.rng import seeded_generator
from pipeline.train.schedules import warmup_cosine

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "views.crop", "judge"]

STAGE = "train_judge"
AUGMENT = 1  # the random stream of the augmentation, below params.seed


def load_split(shards: ShardSet, resolution: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as uint8 [N, 3, R, R] centre crops and int64 labels [N]."""
    loader = DataLoader(ShardImages(shards, resolution), batch_size=256, num_workers=workers)
    images = torch.cat(list(progress(loader, desc=f"judge: {shards.split} images", unit="batch")))
    return images, torch.as_tensor(shards.labels, dtype=torch.long)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to R/8 pixels (reflect padding), per image."""
    b, _, r, _ = x.shape
    pad = max(1, r // 8)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + r, dx[i]:dx[i] + r] for i in range(b)]).to(torch.uint8)


def train(model: Judge, images: torch.Tensor, labels: torch.Tensor, params: Params, d: Dist,
          device: torch.device) -> dict:
    """Train ``model`` in place with the shared loop (resumable; step-indexed batches); returns its summary."""
    cfg = params.judge.train
    per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    identity = resume_identity(params, PARAMS,
                               shards=shards_identity(params.paths.shards))
    loop = TrainLoop(STAGE, params, d, device, steps=total, identity=identity, modules={"model": model},
                     optimizer=opt, lr=warmup_cosine(cfg.lr, total, per_epoch), log_every=cfg.log_every,
                     checkpoint_every=cfg.checkpoint_every, samples_per_step=cfg.batch_size)
    sampler = StepBatches(len(images), cfg.batch_size, params.seed, loop.start, total, d.rank, d.world,
                          key="judge.train.batch_size")
    net = loop.wrap(model)

    def step(idx: torch.Tensor, it: int) -> dict:
        x = augment(images[idx], seeded_generator("cpu", params.seed, AUGMENT, it, d.rank))
        logits = net(judge_input(x.to(device), model.img_size))
        return {"loss": F.cross_entropy(logits, labels[idx].to(device), label_smoothing=cfg.label_smoothing)}

    return {**loop.run(step, (torch.tensor([i for i, _ in items]) for items in sampler)), "epochs": cfg.epochs}


@torch.no_grad()
def accuracy(model: Judge, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch: int = 500) -> float:
    model.eval()
    correct = sum((model(judge_input(images[i:i + batch].to(device), model.img_size)).argmax(1).cpu()
                   == labels[i:i + batch]).sum().item() for i in range(0, len(images), batch))
    return correct / len(images)


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    shards = ShardSet(params.paths.shards, "train")
    labels = np.asarray(shards.labels)
    if labels.min() < 0:
        raise RcgError("train_judge: the training images have no labels (a flat folder); drop 'judge' from "
                       "score.spaces and score with the encoder (and Inception) only")
    resolution = params.views.crop
    cfg = params.judge
    if resolution < 2 ** cfg.model.stages:
        raise RcgError(f"judge.model.stages ({cfg.model.stages}) halves views.crop ({resolution} px) below one pixel")
    images, targets = load_split(shards, resolution, cfg.train.workers)
    config = {"model": {"img_size": resolution, "num_classes": int(labels.max()) + 1, **cfg.model.model_dump()}}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(params.seed)
        model = Judge(**config["model"])
    summary = train(model, images, targets, params, d, device)
    if not d.is_main:
        d.barrier()
        return summary
    metrics = {"train_accuracy": round(accuracy(model, images, targets, device), 4),
               "num_train": len(images), "num_val": 0, "num_classes": config["model"]["num_classes"],
               "resolution": resolution, "feature_dim": model.feature_dim, **summary}
    splits = json.loads((params.paths.shards / META_FILE).read_text()).get("splits", {})
    if "val" in splits:
        val = ShardSet(params.paths.shards, "val")
        val_images, val_labels = load_split(val, resolution, cfg.train.workers)
        metrics.update(val_accuracy=round(accuracy(model, val_images, val_labels, device), 4),
                       num_val=len(val_images))
    else:
        log("train_judge: no val split; metrics/judge.json reports the train accuracy only")
    out = params.paths.models / "judge.pt"
    save_model_file(out, MODEL_FORMAT, config, model.state_dict(),
                    summary={**metrics, "trained_on": {"index_sha256": file_sha256(params.paths.shards / INDEX_FILE)}})
    write_json(params.paths.metrics / "judge.json", metrics)
    d.barrier()
    return {"output": str(out), "metrics": str(params.paths.metrics / "judge.json"),
            **{k: metrics[k] for k in ("train_accuracy", "val_accuracy", "seconds") if k in metrics}}
