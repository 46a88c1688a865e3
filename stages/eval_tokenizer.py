"""Stage ``eval_tokenizer``: how well the tokenizer keeps what RCG needs -> ``metrics/tokenizer.json``.

On held-out images (the val split when there is one, else the train split), view 0 (the centre crop):
reconstruction PSNR, codebook usage and perplexity of their tokens, and the Fréchet distance in the encoder's
representation space between originals and reconstructions -- the space the RDM and the pixel generator are
conditioned in. The same distance between two disjoint halves of the originals is reported as its noise scale.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.core import distributed
from pipeline.core.artifacts import write_json
from pipeline.core.config import Params
from pipeline.models.encoder import load_encoder_file, represent
from pipeline.core.errors import RcgError
from pipeline.data.view_store import ViewsDataset
from pipeline.eval.metrics import frechet_distance_between
from pipeline.core.progress import progress
from pipeline.core.runtime import device_for
from pipeline.data.shards import META_FILE, ShardSet
from pipeline.data.views import ViewRecipe
from pipeline.models.vqgan import code_usage, codebook_stats, load_tokenizer


def held_out(params: Params) -> tuple[ShardSet, np.ndarray]:
    """``num_images`` rows spread evenly over the val split (train when there is none): every class, any order."""
    meta = json.loads((params.paths.shards / META_FILE).read_text())
    shards = ShardSet(params.paths.shards, "val" if "val" in meta["splits"] else "train")
    n = min(params.tokenizer.eval.num_images, len(shards))
    if n < 4:
        raise RcgError(f"tokenizer.eval needs at least 4 held-out images, the {shards.split} split has {len(shards)}")
    return shards, np.unique(np.linspace(0, len(shards) - 1, n).round().astype(int))


@torch.inference_mode()
def evaluate(params: Params) -> dict:
    device = device_for(params.runtime)
    models = params.paths.models
    for name, stage in (("tokenizer", "train-tokenizer"), ("encoder", "pretrain-encoder")):
        if not (models / f"{name}.pt").is_file():
            raise RcgError(f"no {name} model at {models / f'{name}.pt'}: run `rcg {stage}` first")
    tokenizer, payload = load_tokenizer(models / "tokenizer.pt")
    tokenizer = tokenizer.to(device).eval()
    encoder = load_encoder_file(models / "encoder.pt")[0].to(device)
    shards, rows = held_out(params)
    recipe = dataclasses.replace(ViewRecipe(**params.views.model_dump()), count=1)  # view 0 only
    loader = DataLoader(Subset(ViewsDataset(shards, recipe), rows.tolist()),
                        batch_size=params.tokenizer.eval.batch_size)
    psnr, reps, reps_rec = [], [], []
    counts = torch.zeros(tokenizer.quantize.n_embed, dtype=torch.long)
    for views in progress(loader, desc="eval_tokenizer", unit="batch"):
        x = views[:, 0].to(device).permute(0, 3, 1, 2).float().div(255).contiguous()
        xrec, _, idx = tokenizer(x)
        xrec = xrec.clamp(0, 1)
        mse = (x - xrec).pow(2).mean((1, 2, 3)).clamp_min(1e-10)
        psnr.append((-10 * mse.log10()).cpu())
        counts += code_usage(idx, len(counts)).cpu()
        reps.append(represent(encoder, x).cpu())
        reps_rec.append(represent(encoder, xrec).cpu())
    reps, reps_rec = torch.cat(reps).double().numpy(), torch.cat(reps_rec).double().numpy()
    return {"psnr": round(torch.cat(psnr).mean().item(), 4),
            **{k: round(v, 6) for k, v in codebook_stats(counts).items()},
            "codebook_size": len(counts),
            "fd_rep": round(frechet_distance_between(reps, reps_rec), 6),
            "fd_rep_halves": round(frechet_distance_between(reps[0::2], reps[1::2]), 6),
            "num_images": len(rows), "split": shards.split, "view": 0, "grid": list(idx.shape[1:]),
            "tokenizer": payload["summary"].get("source"),
            "protocol": "view 0 of evenly spaced held-out rows; PSNR per image on [0,1]-clamped reconstructions, "
                        "averaged; FD in the encoder's representation space, originals vs reconstructions "
                        "(fd_rep_halves: even vs odd originals, the noise scale)"}


def run(params: Params) -> dict:
    d = distributed.init()
    out = params.paths.metrics / "tokenizer.json"
    summary = {}
    if d.is_main:
        started = time.perf_counter()
        metrics = evaluate(params)
        write_json(out, metrics)
        summary = {"metrics": str(out), **{k: metrics[k] for k in ("psnr", "usage", "perplexity", "fd_rep",
                                                                     "fd_rep_halves")},
                   "seconds": round(time.perf_counter() - started, 2)}
    d.barrier()
    return summary
