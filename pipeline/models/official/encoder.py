"""Official MoCo v3 (and RCG's ViT-L) encoder files as our encoders (:func:`pipeline.models.encoder.build_encoder`),
frozen, in eval mode: the architecture read from the file, or checked against the one ``encoder.model`` names."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.artifacts import load_checkpoint
from pipeline.core.errors import RcgError
from pipeline.models.encoder import Encoder, build_encoder, load_strict
from pipeline.models.official.mocov3 import (import_mocov3_state_dict, infer_resnet_config, infer_vit_config,
                                             is_resnet_state_dict)


def load_encoder(path: str | Path, num_heads: int | None = None) -> Encoder:
    """Build the encoder whose shape is read from the file (a ViT, or a ResNet taking 224 px), load it strictly,
    and return it frozen in eval mode."""
    sd = import_mocov3_state_dict(load_checkpoint(path))
    model = build_encoder(file_config(sd, 224, num_heads))
    load_strict(model, sd, str(path))
    return model.eval().requires_grad_(False)


def file_config(sd: dict, img_size: int, num_heads: int | None) -> dict:
    """``encoder.model`` read from a MoCo v3 state dict: a ResNet's (taking ``img_size``, which its weights do not
    record) or a ViT's (``num_heads`` as :func:`infer_vit_config` takes it)."""
    return infer_resnet_config(sd, img_size) if is_resnet_state_dict(sd) else infer_vit_config(sd, num_heads)


def _flat_fields(config: dict) -> dict:
    """``encoder.model`` fields in one level (``resnet.width``), so a file's and the params' compare key by key."""
    fields = {k: v for k, v in config.items() if k != "resnet"}
    return {"arch": "vit", **fields, **{f"resnet.{k}": v for k, v in (config.get("resnet") or {}).items()}}


def load_encoder_as(path: str | Path, config: dict) -> Encoder:
    """Import an official file into the architecture ``config`` names (``encoder.model``), frozen in eval mode.

    A mismatch names the fields that differ (read from the file's shapes) and the keys/shapes that do not fit.
    """
    sd = import_mocov3_state_dict(load_checkpoint(path))
    model = build_encoder(config)
    try:
        load_strict(model, sd, "its state dict")
    except RcgError as exc:
        try:
            have = _flat_fields(file_config(sd, config["img_size"], config.get("num_heads")))
        except RcgError:
            raise RcgError(f"{path}: {exc}") from None
        want = _flat_fields(config)
        diffs = ", ".join(f"{k} {have[k]} (params: {want[k]})" for k in have
                          if k in want and have[k] != want[k] and k != "resnet.stem_stride")  # not in the weights
        if not diffs:
            raise RcgError(f"{path}: {exc}") from None
        raise RcgError(f"{path} is another architecture than encoder.model: the file has {diffs}; {exc}") from None
    return model.eval().requires_grad_(False)
