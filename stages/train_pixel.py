"""Stage ``train_pixel@<cond>``: the MAGE pixel generator trained from ``tokens.zarr`` + ``reps.zarr`` alone.

One instance per conditioning (``pixel.conditionings``): ``rep`` (RCG), ``none`` (the unconditional MAGE baseline:
the same network, the slot always ``fake_latent``), ``class`` (store labels) and ``cluster`` (k-means ids of the
stored reps). No image is decoded and neither the VQGAN nor the encoder runs: a step gathers (tokens[i, v],
reps[i, v]) pairs from the memory-mapped stores. With ``pixel.checkpoints.<cond>`` set, the generator is an
official file instead (``rep``: RCG's rep-conditioned MAGE, ``none``: LTH14/mage's unconditional MAGE), checked
against the stores and evaluated, not trained. Writes ``data/models/pixel-<cond>.pt``, the curves
``metrics/plots/train_pixel-<cond>.csv`` (a header alone for an import, which trains nothing) and
``metrics/pixel-<cond>.json``. The parts: the store pairs (pipeline.data.pixel_data), the MAGE recipe on the shared
loop (pipeline.train.pixel), the official import (pipeline.models.official.mage), the evaluation
(pipeline.eval.pixel_eval).
"""

from __future__ import annotations

import contextlib
import time

import torch

from pipeline.core import distributed
from pipeline.core.artifacts import save_model, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError, require_file
from pipeline.core.progress import log
from pipeline.core.rng import seeded_generator
from pipeline.core.runtime import device_for
from pipeline.data.pixel_data import load_pixel_data
from pipeline.eval.pixel_eval import masked_token_eval
from pipeline.models.mage import CONDITIONINGS, mage_kwargs
from pipeline.models.official.mage import load_official_mage_model
from pipeline.train.pixel import STAGE, conditioning_input, train
from pipeline.train.state import CurveLog

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "pixel.checkpoints.{item}", "pixel.model", "pixel.train", "pixel.eval", "pixel.cluster"]


def run(params: Params, item: str) -> dict:
    conditioning = item
    if conditioning not in CONDITIONINGS:
        raise RcgError(f"train_pixel: unknown conditioning {item!r} (one of {', '.join(CONDITIONINGS)})")
    if conditioning not in params.pixel.conditionings:
        raise RcgError(f"train_pixel: {item!r} is not in pixel.conditionings {params.pixel.conditionings}")
    checkpoint = params.pixel.checkpoints[conditioning]
    require_file(checkpoint, f"pixel.checkpoints.{conditioning}")
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    started = time.perf_counter()
    p, paths = params.pixel, params.paths
    data = load_pixel_data(paths.tokens, paths.reps, conditioning, p.eval.num_images, params.seed, device,
                           clusters=p.cluster.k if conditioning == "cluster" else 0, kmeans_iters=p.cluster.iters)
    num_labels = data.num_labels if conditioning in ("class", "cluster") else 0
    kwargs = mage_kwargs(p.model, data.codebook_size, data.tokens.shape[2], data.reps.shape[2], conditioning,
                         num_labels)
    if checkpoint is not None:
        if d.world > 1:
            raise RcgError(f"importing pixel.checkpoints.{conditioning} needs no torchrun: run it on one process")
        model, summary = load_official_mage_model(checkpoint, kwargs, data.identity["reps"], str(paths.reps),
                                                  data.identity["tokens"], str(paths.tokens),
                                                  paths.model_file("tokenizer"))
        model, ema = model.to(device), None
        CurveLog(paths.plots / f"{STAGE}-{conditioning}.csv", [])  # what dvc.yaml declares; no training rows
    else:
        model, ema, summary = train(params, data, kwargs, conditioning, d, device)
    if not d.is_main:
        return {"rank": d.rank, **summary}

    tic = time.perf_counter()
    metrics = {"source": summary["source"], "val_images": len(data.val_rows), "mask_ratio": p.eval.mask_ratio}
    if summary.get("final_loss") is not None:
        metrics["train_loss"] = summary["final_loss"]
    if len(data.val_rows):
        rows = data.val_rows
        views = torch.zeros_like(rows)  # view 0: the centre crop
        scope = ema.swapped_in(model) if ema is not None else contextlib.nullcontext()
        with scope:
            metrics.update(masked_token_eval(model, data.tokens_at(rows, views),
                                             conditioning_input(data, conditioning, rows, views), p.eval.mask_ratio,
                                             seeded_generator(device, params.seed, "pixel.eval"), p.eval.batch_size))
    summary["eval_seconds"] = round(time.perf_counter() - tic, 2)
    labels = None
    if num_labels:
        labels = {"source": conditioning, "num_labels": num_labels, "counts": data.label_counts()}
        if data.centroids is not None:
            labels["centroids"] = data.centroids
    config = {"model": kwargs, "conditioning": conditioning, "grid": data.grid, "labels": labels,
              "reps": data.identity["reps"], "tokens": data.identity["tokens"], "holdout": p.eval.num_images}
    out, metrics_path = paths.model_file("pixel", conditioning), paths.metrics / f"pixel-{conditioning}.json"
    save_model("pixel", out, config, model.state_dict(), ema.state_dict() if ema is not None else None, summary)
    write_json(metrics_path, metrics)
    if "val_loss" in metrics:
        log(f"{STAGE}@{conditioning}: val loss {metrics['val_loss']:.4f} (unconditional slot "
            f"{metrics['val_loss_null']:.4f}), masked-token accuracy {metrics['val_accuracy']:.3f}")
    return {"output": str(out), "metrics": str(metrics_path), **summary,
            **{k: v for k, v in metrics.items() if k.startswith("val_")},
            "seconds": round(time.perf_counter() - started, 2)}
