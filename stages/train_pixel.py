"""Stage ``train_pixel@<cond>``: the MAGE pixel generator trained from ``tokens.zarr`` + ``reps.zarr`` alone.

One instance per conditioning (``pixel.conditionings``): ``rep`` (RCG), ``none`` (the unconditional MAGE baseline:
the same network, the slot always ``fake_latent``), ``class`` (store labels) and ``cluster`` (k-means ids of the
stored reps). No image is decoded and neither the VQGAN nor the encoder runs: a step gathers (tokens[i, v],
reps[i, v]) pairs from the memory-mapped stores. With ``pixel.checkpoints.<cond>`` set, the generator is an
official file instead (``rep``: RCG's rep-conditioned MAGE, ``none``: LTH14/mage's unconditional MAGE), checked
against the stores and evaluated, not trained. Writes ``data/models/pixel-<cond>.pt``, the curves
``metrics/plots/train_pixel-<cond>.csv`` (a header alone for an import, which trains nothing) and
``metrics/pixel-<cond>.json``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from pipeline.core import distributed
from pipeline.core.artifacts import load_model_file, save_model, write_json
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError, require_file
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.data.alignment import check_tokenizer
from pipeline.data.pixel_data import PixelBatches, PixelData, load_pixel_data
from pipeline.eval.pixel_eval import masked_token_eval
from pipeline.models.mage import CONDITIONINGS, MAGE, mage_kwargs, masked_token_loss
from pipeline.models.official.mage import load_official_mage_model
from pipeline.models.vqgan import MODEL_FORMAT as TOKENIZER_FORMAT
from pipeline.models.ema import EMA
from pipeline.train.identity import resume_identity
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.core.rng import seeded_generator
from pipeline.train.schedules import warmup_cosine
from pipeline.train.state import CurveLog

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "pixel.checkpoints.{item}", "pixel.model", "pixel.train", "pixel.eval", "pixel.cluster"]

STAGE = "train_pixel"


def tokenizer_codebook(path: Path, tokens_path: Path, tokens_identity: dict) -> torch.Tensor:
    """The code vectors [K, D] of the tokenizer file that made ``tokens.zarr`` (its sha256 must be the one the
    store records): what ``pixel.train.codebook_init`` starts the word embeddings from."""
    if not path.exists():
        raise RcgError(f"pixel.train.codebook_init needs the tokenizer that made the tokens: {path} is missing")
    check_tokenizer(tokens_identity, tokens_path, path)
    state = load_model_file(path, TOKENIZER_FORMAT)["state_dict"]
    return state["quantize.embedding.weight"]


def conditioning_input(data: PixelData, conditioning: str, rows: torch.Tensor,
                       views: torch.Tensor) -> torch.Tensor | None:
    """What the slot is built from: reps[i, v] (rep), labels[i] (class/cluster), nothing (none)."""
    if conditioning == "rep":
        return data.reps_at(rows, views)
    return data.labels[rows] if conditioning in ("class", "cluster") else None


def train(params: Params, data: PixelData, kwargs: dict, conditioning: str, d: Dist,
          device: torch.device) -> tuple[MAGE, EMA | None, dict]:
    """Train (or resume) MAGE on the store pairs with the MAGE recipe; -> (model, EMA or None, loop summary)."""
    t = params.pixel.train
    torch.manual_seed(params.seed)  # identical init on every rank (the loop then seeds dropout per rank and step)
    model = MAGE(**kwargs).to(device)
    if t.codebook_init:
        model.init_from_codebook(tokenizer_codebook(params.paths.model_file("tokenizer"), params.paths.tokens,
                                                    data.identity["tokens"]),
                                 seeded_generator("cpu", params.seed, "pixel.codebook_init"))
    lr = t.blr * t.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)
    ema = EMA(model, max_decay=t.ema_decay) if t.ema_decay is not None else None
    keys = ["seed", "pixel.model", "pixel.train", "pixel.eval.num_images"] + \
        (["pixel.cluster"] if conditioning == "cluster" else [])
    identity = resume_identity(params, keys, conditioning=conditioning, **data.identity)
    loop = TrainLoop.from_section(f"{STAGE}-{conditioning}", params, t, d, device, steps=t.steps, identity=identity,
                                  modules={"model": model}, optimizer=optimizer,
                                  lr=warmup_cosine(lr, t.steps, t.warmup_steps), ema=ema,
                                  ema_model=model if ema else None)
    net = loop.wrap(model)
    batches = PixelBatches(data, t.batch_size, t.accum_steps, params.seed, d)

    def step(micro: tuple, it: int) -> dict:
        rows, views, gen = micro
        c = conditioning_input(data, conditioning, rows, views)
        loss, accuracy = masked_token_loss(model, data.tokens_at(rows, views), c, gen, net=net)
        return {"loss": loss, "accuracy": accuracy}

    def stream():
        for it in range(loop.start, t.steps):
            micro = batches(it)
            yield micro if t.accum_steps > 1 else micro[0]

    if loop.start < t.steps:
        log(f"{STAGE}@{conditioning}: {sum(p.numel() for p in model.parameters()):,} params, lr {lr:.3g}, "
            f"steps {loop.start}..{t.steps}, batch {t.batch_size}, {len(data.train_rows)} images x "
            f"{data.tokens.shape[1]} views of {data.tokens.shape[2]} tokens")
    model.train()
    summary = loop.run(step, stream())
    return model, ema, {"source": "trained", "lr": lr, "world": d.world, **summary}


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
