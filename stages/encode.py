"""Stage ``encode``: every view of every training image through the frozen encoder, once -> ``data/reps.zarr``.

Then a k-NN probe of what was stored next to the same probe of a randomly initialised encoder of the same
shape -> ``metrics/encoder.json``. The probe is leave-one-out over view 0 (the centre crop) of a seeded subset
of the train split: it measures the store itself, at no extra encoding cost for the trained encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, weights_sha256, write_json
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.models.encoder import MoCoViT, load_encoder_file, represent
from pipeline.core.errors import RcgError
from pipeline.data.view_store import ViewsDataset, build_view_store, views_to_float
from pipeline.eval.metrics import knn_accuracy
from pipeline.core.progress import log, progress
from pipeline.core.runtime import device_for
from pipeline.data.shards import ShardSet
from pipeline.data.stores import StoreWriter, open_store
from pipeline.data.views import ViewRecipe

NORMALIZATION = {
    "function": "pipeline.models.encoder.represent/v1",
    "input": "uint8 view / 255, ImageNet mean/std, then bicubic resize (align_corners=False, no antialias) "
             "to input_size when the crop differs",
    "output": "projector output, standardised per sample (mean 0, unbiased std 1)",
}


def encoder_fn(model: MoCoViT, device: torch.device, bf16: bool) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 views [B, V, H, W, 3] -> representations float32 [B, V, D]."""
    autocast = torch.bfloat16 if bf16 and device.type == "cuda" else None
    size = model.patch_embed.img_size[0]

    def fn(views: torch.Tensor) -> np.ndarray:
        r = represent(model, views_to_float(views, device), input_size=size, autocast_dtype=autocast)
        return r.reshape(*views.shape[:2], -1).cpu().numpy()

    return fn


def load_model(params: Params, device: torch.device) -> tuple[MoCoViT, dict]:
    path = params.paths.models / "encoder.pt"
    if not path.is_file():
        raise RcgError(f"no encoder model at {path}: run `rcg pretrain-encoder` first "
                       "(it imports encoder.checkpoint when one is set)")
    model, payload = load_encoder_file(path)
    return model.to(device), payload


def encode_part(params: Params, d: Dist) -> tuple[StoreWriter, dict]:
    """Encode this rank's pending chunks into ``reps.zarr.partial`` (rank 0 creates or vets the partial)."""
    device = device_for(params.runtime, d.local_rank)
    model, payload = load_model(params, device)
    recipe = ViewRecipe(**params.views.model_dump())
    dim = payload["config"]["model"]["proj_dim"]
    identity = {
        "encoder": {"sha256": file_sha256(params.paths.models / "encoder.pt"), "config": payload["config"],
                    "weights_sha256": weights_sha256(model.state_dict())},
        "normalization": {**NORMALIZATION, "input_size": model.patch_embed.img_size[0]},
        "dim": dim,
    }
    return build_view_store(params.paths.reps, "reps", params.paths.shards, recipe, identity, (dim,), "float32",
                            encoder_fn(model, device, params.encode.bf16), params.encode, device, d, "encode")


def knn_probe(params: Params, device: torch.device) -> dict:
    """k-NN top-1 of the stored view-0 representations and of a seeded random-init encoder's, same images."""
    e = params.encode
    shards = ShardSet(params.paths.shards, "train")
    labels = np.asarray(shards.labels)
    if labels.min() < 0:
        log("encode: the images have no labels, so there is no k-NN probe")
        return {"knn_top1": None, "knn_top1_random_init": None, "k": e.knn_k, "num_images": 0}
    n = len(labels)
    rows = np.arange(n)
    if 0 < e.knn_images < n:
        rows = np.sort(np.random.default_rng(params.seed).choice(n, e.knn_images, replace=False))
    stored = open_store(params.paths.reps, "reps")["reps"].oindex[rows, 0]

    model, payload = load_model(params, device)
    torch.manual_seed(params.seed)
    random_init = MoCoViT(**payload["config"]["model"]).to(device).eval()
    fn = encoder_fn(random_init, device, e.bf16)
    recipe = dataclasses.replace(ViewRecipe(**params.views.model_dump()), count=1)  # view 0 only
    loader = DataLoader(Subset(ViewsDataset(shards, recipe), rows.tolist()), batch_size=e.batch_size,
                        num_workers=e.workers)
    baseline = np.concatenate([fn(views)[:, 0] for views in progress(loader, desc="random-init probe",
                                                                       unit="batch")])
    return {"knn_top1": round(knn_accuracy(stored, labels[rows], k=e.knn_k), 4),
            "knn_top1_random_init": round(knn_accuracy(baseline, labels[rows], k=e.knn_k), 4),
            "k": e.knn_k, "num_images": len(rows), "encoder": payload["summary"].get("source"),
            "protocol": "leave-one-out over view 0 of the train split, cosine similarity, exp(sim/0.07) votes"}


def finish(params: Params, writer: StoreWriter, stats: dict) -> dict:
    """Main rank, after every rank is done: move the store into place, probe it, write the metrics."""
    writer.finalize()
    metrics = knn_probe(params, device_for(params.runtime))
    out = params.paths.metrics / "encoder.json"
    write_json(out, metrics)
    shape = list(open_store(params.paths.reps, "reps")["reps"].shape)
    return {"output": str(params.paths.reps), "shape": shape, "metrics": str(out),
            **stats, **{k: metrics[k] for k in ("knn_top1", "knn_top1_random_init")}}


def run(params: Params) -> dict:
    d = distributed.init()
    writer, stats = encode_part(params, d)
    d.barrier()
    summary = finish(params, writer, stats) if d.is_main else stats
    d.barrier()
    return summary
