"""Official MoCo v3 (and RCG's ViT-L) encoder files as our :class:`pipeline.models.encoder.MoCoViT`, frozen, in eval
mode: the architecture read from the file, or checked against the one ``encoder.model`` names."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.artifacts import load_checkpoint
from pipeline.core.errors import RcgError
from pipeline.models.encoder import MoCoViT, load_strict
from pipeline.models.official.mocov3 import import_mocov3_state_dict, infer_vit_config


def load_encoder(path: str | Path, num_heads: int | None = None) -> MoCoViT:
    """Build a MoCoViT whose shape is read from the file, load it strictly, and return it frozen in eval mode."""
    sd = import_mocov3_state_dict(load_checkpoint(path))
    model = MoCoViT(**infer_vit_config(sd, num_heads))
    load_strict(model, sd, str(path))
    return model.eval().requires_grad_(False)


def load_encoder_as(path: str | Path, config: dict) -> MoCoViT:
    """Import an official file into the architecture ``config`` names (MoCoViT kwargs), frozen in eval mode.

    A mismatch names the fields that differ (read from the file's shapes) and the keys/shapes that do not fit.
    """
    sd = import_mocov3_state_dict(load_checkpoint(path))
    model = MoCoViT(**config)
    try:
        load_strict(model, sd, "its state dict")
    except RcgError as exc:
        try:
            have = infer_vit_config(sd, config["num_heads"])
        except RcgError:
            raise RcgError(f"{path}: {exc}") from None
        diffs = ", ".join(f"{k} {have[k]} (params: {config[k]})" for k in config if have[k] != config[k])
        if not diffs:
            raise RcgError(f"{path}: {exc}") from None
        raise RcgError(f"{path} is another architecture than encoder.model: the file has {diffs}; {exc}") from None
    return model.eval().requires_grad_(False)
