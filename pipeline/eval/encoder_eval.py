"""What the ``encode`` stage reports of the store it wrote: a k-NN probe of the stored reps next to the same
probe of a randomly initialised encoder of the same shape (docs/metrics.md, encoder.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.core.config import Encode
from pipeline.core.progress import log, progress
from pipeline.data.shards import ShardSet
from pipeline.data.stores import open_store
from pipeline.models.view_encoder import encoder_fn
from pipeline.data.view_store import ViewsDataset
from pipeline.data.views import ViewRecipe
from pipeline.eval.probes import knn_accuracy
from pipeline.models.encoder import build_encoder


def encoder_knn_probe(reps_path: Path, shards_dir: Path, recipe: ViewRecipe, encoder_config: dict, cfg: Encode,
                      seed: int, device: torch.device) -> dict:
    """k-NN top-1 of the stored view-0 reps and of a seeded random-init encoder's (``encoder_config``: the
    encoder file's ``config``), leave-one-out over the same seeded ``cfg.knn_images`` train images.

    It measures the store itself, at no extra encoding cost for the trained encoder; the random-init encoder
    is the floor that says how much of the score the architecture and the views give for free."""
    shards = ShardSet(shards_dir, "train")
    labels = np.asarray(shards.labels)
    if labels.min() < 0:
        log("encode: the images have no labels, so there is no k-NN probe")
        return {"labelled": False, "knn_k": cfg.knn_k, "num_images": 0}
    n = len(labels)
    rows = np.arange(n)
    if 0 < cfg.knn_images < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, cfg.knn_images, replace=False))
    stored = open_store(reps_path, "reps")["reps"].oindex[rows, 0]

    torch.manual_seed(seed)
    random_init = build_encoder(encoder_config["model"]).to(device).eval()
    fn = encoder_fn(random_init, device, cfg.bf16)
    view0 = dataclasses.replace(recipe, count=1)
    loader = DataLoader(Subset(ViewsDataset(shards, view0), rows.tolist()), batch_size=cfg.batch_size,
                        num_workers=cfg.workers)
    baseline = np.concatenate([fn(views)[:, 0] for views in progress(loader, desc="random-init probe", unit="batch")])
    return {"labelled": True, "knn_top1": round(knn_accuracy(stored, labels[rows], k=cfg.knn_k), 4),
            "knn_top1_random_init": round(knn_accuracy(baseline, labels[rows], k=cfg.knn_k), 4),
            "knn_k": cfg.knn_k, "num_images": len(rows)}
