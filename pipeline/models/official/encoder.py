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
    config = infer_resnet_config(sd) if is_resnet_state_dict(sd) else infer_vit_config(sd, num_heads)
    model = build_encoder(config)
    load_strict(model, sd, str(path))
    return model.eval().requires_grad_(False)


def _file_fields(sd: dict, config: dict) -> dict:
    """The file's ``encoder.model`` fields, flattened like ``config``'s, to name what differs."""
    if is_resnet_state_dict(sd):
        have = infer_resnet_config(sd, config["img_size"])
        return {"arch": "resnet", **{f"resnet.{k}": v for k, v in have.pop("resnet").items()}, **have}
    return {"arch": "vit", **infer_vit_config(sd, config.get("num_heads"))}


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
            have = _file_fields(sd, config)
        except RcgError:
            raise RcgError(f"{path}: {exc}") from None
        want = {"arch": config.get("arch", "vit"), **config,
                **{f"resnet.{k}": v for k, v in (config.get("resnet") or {}).items()}}
        diffs = ", ".join(f"{k} {have[k]} (params: {want[k]})" for k in have
                          if k in want and have[k] != want[k] and k != "resnet.stem_stride")  # not in the weights
        if not diffs:
            raise RcgError(f"{path}: {exc}") from None
        raise RcgError(f"{path} is another architecture than encoder.model: the file has {diffs}; {exc}") from None
    return model.eval().requires_grad_(False)
