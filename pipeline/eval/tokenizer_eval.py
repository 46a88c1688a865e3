"""How well a tokenizer keeps what RCG needs, on held-out images: reconstruction PSNR, codebook usage and
perplexity of their tokens, and the Fréchet distance between originals and reconstructions in the encoder's
representation space -- the space the RDM and the pixel generator are conditioned in (docs/metrics.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.core.errors import RcgError
from pipeline.core.progress import progress
from pipeline.data.shards import META_FILE, ShardSet
from pipeline.data.view_store import ViewsDataset
from pipeline.data.views import ViewRecipe
from pipeline.eval.metrics import frechet_distance_between
from pipeline.models.encoder import Encoder, represent
from pipeline.models.vqgan import VQGAN, code_usage, codebook_stats


def held_out(shards_dir: Path, num_images: int) -> tuple[ShardSet, np.ndarray]:
    """``num_images`` rows spread evenly over the val split (train when there is none): every class, any order."""
    meta = json.loads((shards_dir / META_FILE).read_text())
    shards = ShardSet(shards_dir, "val" if "val" in meta["splits"] else "train")
    n = min(num_images, len(shards))
    if n < 4:
        raise RcgError(f"tokenizer.eval needs at least 4 held-out images, the {shards.split} split has {len(shards)}")
    return shards, np.unique(np.linspace(0, len(shards) - 1, n).round().astype(int))


@torch.inference_mode()
def evaluate_tokenizer(tokenizer: VQGAN, encoder: Encoder, shards: ShardSet, rows: np.ndarray, recipe: ViewRecipe,
                       batch_size: int, device: torch.device) -> dict:
    """View 0 (the centre crop) of ``rows``: PSNR per image on [0,1]-clamped reconstructions, averaged; codebook
    usage and perplexity; FD of the encoder's reps, originals vs reconstructions, and the same between the even
    and the odd originals (``fd_rep_halves``), the noise scale of that FD."""
    tokenizer = tokenizer.to(device).eval()
    view0 = dataclasses.replace(recipe, count=1)
    loader = DataLoader(Subset(ViewsDataset(shards, view0), rows.tolist()), batch_size=batch_size)
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
            "num_images": len(rows), "split": shards.split, "grid_h": int(idx.shape[1]), "grid_w": int(idx.shape[2])}


@torch.no_grad()
def reconstructions(tokenizer: VQGAN, shards: ShardSet, rows: np.ndarray, recipe: ViewRecipe,
                    device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """View 0 of ``rows`` and its reconstruction, both uint8 [N, H, W, 3] (truncated, as samples are): what a
    person looks at to see whether shape, colour and background survive tokenization."""
    tokenizer = tokenizer.to(device).eval()
    view0 = dataclasses.replace(recipe, count=1)
    views = torch.stack([ViewsDataset(shards, view0)[int(i)] for i in rows])[:, 0]
    x = views.to(device).permute(0, 3, 1, 2).float().div(255)
    xrec = tokenizer(x)[0].clamp(0, 1)
    return views.numpy(), (xrec * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
