"""The official MoCo v3 state-dict layout: its sizes, the key mapping of official / RCG files to our encoder's keys,
and the architecture read from tensor shapes. No model code (and no timm), so the stages that only check which
encoder a file embeds (the RDM, sampling, the official MAGE import) do not load the ViT library."""

from __future__ import annotations

import math
import re
from pathlib import Path

from pipeline.core.artifacts import weights_sha256
from pipeline.core.errors import RcgError
from pipeline.core.progress import log

# MoCo v3's sizes (its ViT-S uses 12 heads, unlike DeiT-S's 6).
VIT_SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=12),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
HEADS_BY_WIDTH = {v["embed_dim"]: v["num_heads"] for v in VIT_SIZES.values()}

# RCG's ViT-L file stores these base-encoder keys under wrong names; they must be renamed, not copied.
VITL_KEY_FIXES = {
    "blocks.13.norm13.": "blocks.13.norm1.",
    "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
    "blocks.14.norm14.": "blocks.14.norm2.",
    "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2.",
}


def import_mocov3_state_dict(ckpt: dict) -> dict:
    """Base-encoder weights of an official MoCo v3 / RCG file (wrapped or bare, prefixed or already stripped),
    with ``module.base_encoder.`` stripped and the ViT-L misnamed keys renamed."""
    if not isinstance(ckpt, dict):
        raise RcgError(f"encoder checkpoint must be a dict, got {type(ckpt).__name__}")
    sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    for prefix in ("module.base_encoder.", "base_encoder."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    fix = re.compile("^(" + "|".join(re.escape(k) for k in VITL_KEY_FIXES) + ")")
    return {fix.sub(lambda m: VITL_KEY_FIXES[m.group(1)], k): v for k, v in sd.items()}


def infer_vit_config(state_dict: dict, num_heads: int | None = None) -> dict:
    """MoCoViT constructor kwargs read from tensor shapes; heads are not in the weights, so they come from
    ``num_heads`` or the standard width -> heads map."""
    sd = import_mocov3_state_dict(state_dict)
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "head.0.weight", "head.6.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise RcgError(f"not a MoCo v3 ViT state dict: missing {', '.join(missing)}")
    embed_dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    heads = num_heads or HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        raise RcgError(f"cannot infer num_heads for embed_dim {embed_dim}; give it explicitly")
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim,
                depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), num_heads=heads,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                proj_hidden_dim=sd["head.0.weight"].shape[0], proj_dim=sd["head.6.weight"].shape[0])


def is_resnet_state_dict(state_dict: dict) -> bool:
    """Whether an official file's base encoder is a MoCo v3 ResNet (torchvision names) rather than a ViT."""
    sd = import_mocov3_state_dict(state_dict)
    return "conv1.weight" in sd and "layer1.0.conv1.weight" in sd


def infer_resnet_config(state_dict: dict, img_size: int = 224) -> dict:
    """``encoder.model`` fields of a MoCo v3 ResNet read from tensor shapes. The input size is not in a ResNet's
    weights (its convolutions take any size): ``img_size`` gives it (MoCo v3 trains at 224)."""
    sd = import_mocov3_state_dict(state_dict)
    need = ("conv1.weight", "layer1.0.conv1.weight", "fc.0.weight", "fc.3.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise RcgError(f"not a MoCo v3 ResNet state dict: missing {', '.join(missing)}")
    width, _, kernel, _ = sd["conv1.weight"].shape
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layer(\d+)\.", k))})
    layers = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in stages]
    resnet = dict(block="bottleneck" if "layer1.0.conv3.weight" in sd else "basic", layers=layers, width=width,
                  stem="imagenet" if kernel == 7 else "conv3x3", stem_stride=1)
    return dict(arch="resnet", img_size=img_size, proj_hidden_dim=sd["fc.0.weight"].shape[0],
                proj_dim=sd["fc.3.weight"].shape[0], resnet=resnet)


def check_official_encoder(embedded: dict, store_identity: dict, store_name: str, path: Path,
                           model_name: str = "RDM") -> str:
    """Refuse an official RDM (or MAGE: ``model_name``) trained on another encoder than the one a store's reps came from.

    The file carries the MoCo v3 weights it was trained with (``pretrained_encoder.*``); the store records
    its encoder's config (and, when the encode stage wrote it, ``weights_sha256``) in ``store_identity``, so
    the check reads nothing beyond the store. Returns what was compared: "weights" or "architecture".
    """
    if not embedded:
        raise RcgError(f"{path} carries no pretrained_encoder.* weights: nothing shows which encoder it was "
                       "trained with")
    enc = store_identity.get("encoder") or {}
    have = (enc.get("config") or {}).get("model")
    if not isinstance(have, dict):
        raise RcgError(f"{store_name} does not record its encoder's config (identity.encoder.config.model)")
    if have.get("arch", "vit") != "vit":
        raise RcgError(f"this {model_name} was trained on a MoCo v3 ViT's reps, but {store_name} was encoded with a "
                       f"{have['arch']} encoder (encoder.model.arch)")
    try:
        trained = infer_vit_config(embedded, have.get("num_heads"))
    except RcgError as exc:
        raise RcgError(f"{path}: pretrained_encoder.*: {exc}") from None
    diffs = [f"{k} {trained[k]} (store's encoder: {have[k]})" for k in trained if k in have and trained[k] != have[k]]
    if diffs:
        raise RcgError(f"this {model_name} was trained with another encoder than the one {store_name} was encoded with: "
                       + ", ".join(diffs))
    if "weights_sha256" not in enc:
        log(f"warning: {store_name} records no encoder weights hash; checked the encoder architecture only")
        return "architecture"
    if weights_sha256(import_mocov3_state_dict(embedded)) != enc["weights_sha256"]:
        raise RcgError(f"this {model_name} was trained with another encoder than the one {store_name} was encoded with "
                       "(same architecture, different weights)")
    return "weights"
