"""Views -> representations through the frozen encoder, into ``reps.zarr`` (what the ``encode`` stage runs).

The loop over the views is :func:`pipeline.data.view_store.build_view_store`, shared with ``tokenize``
(:mod:`pipeline.models.view_tokenizer`): it takes the model's forward as a callable; this module gives it the
encoder's (:func:`encoder_fn`) and the store's identity. ``params`` is the whole params tree (read by attribute).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.core.artifacts import file_sha256, load_model, weights_sha256
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.runtime import uses_bf16
from pipeline.data.stores import StoreWriter
from pipeline.data.view_store import build_view_store, views_to_float
from pipeline.data.views import ViewRecipe
from pipeline.models.encoder import Encoder, represent

NORMALIZATION = {
    "function": "pipeline.models.encoder.represent/v1",
    "input": "uint8 view / 255, ImageNet mean/std, then bicubic resize (align_corners=False, no antialias) "
             "to input_size when the crop differs",
    "output": "projector output, standardised per sample (mean 0, unbiased std 1)",
}


def load_frozen_encoder(path: Path, device: torch.device) -> tuple[Encoder, dict]:
    """The encoder of an "rcg-encoder" file on ``device`` and the file's payload; a missing file names the stage
    that writes it."""
    if not path.is_file():
        raise RcgError(f"no encoder model at {path}: run `rcg pretrain-encoder` first "
                       "(it imports encoder.checkpoint when one is set)")
    model, payload = load_model("encoder", path)
    return model.to(device), payload


def encoder_fn(model: Encoder, device: torch.device, bf16: bool) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 views [B, V, H, W, 3] -> representations float32 [B, V, D] (bf16 autocast where native)."""
    autocast = torch.bfloat16 if uses_bf16(bf16, device) else None
    size = model.input_size

    def fn(views: torch.Tensor) -> np.ndarray:
        r = represent(model, views_to_float(views, device), input_size=size, autocast_dtype=autocast)
        return r.reshape(*views.shape[:2], -1).cpu().numpy()

    return fn


def build_rep_store(params, d: Dist, device: torch.device) -> tuple[StoreWriter, dict]:
    """Encode this rank's pending chunks into ``reps.zarr.partial`` (rank 0 creates or vets the partial).

    The store's identity names the encoder file, its config and weights hash (what train_rdm checks an official
    RDM against) and how views become reps. Returns the writer (the main rank finalises it) and timing stats."""
    path = params.paths.model_file("encoder")
    model, payload = load_frozen_encoder(path, device)
    dim = payload["config"]["model"]["proj_dim"]
    identity = {
        "encoder": {"sha256": file_sha256(path), "config": payload["config"],
                    "weights_sha256": weights_sha256(model.state_dict())},
        "normalization": {**NORMALIZATION, "input_size": model.input_size},
        "dim": dim,
    }
    return build_view_store(params.paths.reps, "reps", params.paths.shards, ViewRecipe(**params.views.model_dump()),
                            identity, (dim,), "float32", encoder_fn(model, device, params.encode.bf16),
                            params.encode, device, d, "encode")
