"""Views -> token ids through the frozen VQGAN, into ``tokens.zarr`` (what the ``tokenize`` stage runs).

The views come from the same :func:`pipeline.data.views.make_view` as ``encode``'s (through the same view
store loop), so ``tokens[i, v]`` and ``reps[i, v]`` describe the same pixels;
:func:`pipeline.data.alignment.check_aligned` lets a consumer verify it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.core.artifacts import file_sha256, load_model
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.runtime import autocast as runtime_autocast
from pipeline.data.stores import StoreWriter
from pipeline.data.view_store import build_view_store, views_to_float
from pipeline.data.views import ViewRecipe
from pipeline.models.vqgan import VQGAN


def load_frozen_tokenizer(path: Path, device: torch.device) -> tuple[VQGAN, dict]:
    """The VQGAN of an "rcg-tokenizer" file on ``device``, frozen, and the file's payload; a missing file names
    the stage that writes it."""
    if not path.is_file():
        raise RcgError(f"no tokenizer model at {path}: run `rcg train-tokenizer` first "
                       "(it imports tokenizer.checkpoint when one is set)")
    model, payload = load_model("tokenizer", path)
    return model.to(device).eval().requires_grad_(False), payload


def tokenizer_fn(model: VQGAN, device: torch.device, bf16: bool) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 views [B, V, H, W, 3] -> token ids uint16 [B, V, h, w] (pixels in [0, 1], no normalisation)."""
    @torch.inference_mode()
    def fn(views: torch.Tensor) -> np.ndarray:
        with runtime_autocast(bf16, device):
            idx = model.encode_to_indices(views_to_float(views, device))
        return idx.reshape(*views.shape[:2], *idx.shape[1:]).to(torch.int32).cpu().numpy().astype(np.uint16)

    return fn


def build_token_store(params, d: Dist, device: torch.device) -> tuple[StoreWriter, dict]:
    """Tokenize this rank's pending chunks into ``tokens.zarr.partial`` (rank 0 creates or vets the partial).
    Returns the writer (the main rank finalises it) and timing stats."""
    path = params.paths.model_file("tokenizer")
    model, payload = load_frozen_tokenizer(path, device)
    recipe = ViewRecipe(**params.views.model_dump())
    f = model.downsample_factor
    if recipe.crop % f:
        raise RcgError(f"views.crop ({recipe.crop}) is not a multiple of the tokenizer's downsampling factor {f}")
    grid = [recipe.crop // f, recipe.crop // f]
    identity = {"tokenizer": {"sha256": file_sha256(path), "config": payload["config"]}, "grid": grid,
                "codebook_size": model.quantize.n_embed}
    return build_view_store(params.paths.tokens, "tokens", params.paths.shards, recipe, identity, tuple(grid),
                            "uint16", tokenizer_fn(model, device, params.tokenize.bf16), params.tokenize, device,
                            d, "tokenize")
