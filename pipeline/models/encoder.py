"""MoCo v3 representation encoder: the ViT, the choice of backbone, and RCG's representation.

The ViT's module layout mirrors MoCo v3's (timm VisionTransformer whose ``head`` is the 3-layer projector), so the
official ``module.base_encoder.*`` weights load strictly once that prefix is stripped. MoCo v3 also trains ResNets
(:mod:`pipeline.models.resnet`); ``encoder.model.arch`` picks one, and every stage reads either through
:func:`build_encoder` and :func:`represent`.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from pipeline.core.artifacts import register_model_kind
from pipeline.core.errors import RcgError
from pipeline.models.mlp import build_mlp
from pipeline.models.resnet import MoCoResNet

MODEL_FORMAT = "rcg-encoder"  # data/models/encoder.pt, whether pretrained here or imported
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def sincos_pos_embed(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos table [1, 1 + h*w, dim]; cls row zeros; token m at row m // w, column m % w."""
    assert dim % 4 == 0, "2D sin-cos position embedding needs embed_dim divisible by 4"
    h, w = grid_size
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    out_r = rows.flatten()[:, None] * omega[None]
    out_c = cols.flatten()[:, None] * omega[None]
    pe = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


class MoCoViT(VisionTransformer):
    """MoCo v3 ViT: cls token after the final LayerNorm -> 3-layer projector stored as ``head``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, proj_hidden_dim: int = 4096, proj_dim: int = 256):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
                         global_pool="token", class_token=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                         weight_init="moco")
        pe = sincos_pos_embed(self.patch_embed.grid_size, embed_dim)
        self.pos_embed = nn.Parameter(pe.to(self.pos_embed), requires_grad=False)
        # MoCo v3 initialises the patch projection like a linear layer (xavier-uniform on the flattened kernel).
        val = math.sqrt(6.0 / float(3 * patch_size * patch_size + embed_dim))
        nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.head = build_mlp(3, embed_dim, proj_hidden_dim, proj_dim)

    @property
    def input_size(self) -> int:
        return self.patch_embed.img_size[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-projector cls feature [B, embed_dim] (timm 0.3.2's ``forward_features``)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def project(self, feature: torch.Tensor) -> torch.Tensor:
        return self.head(feature)


Encoder = MoCoViT | MoCoResNet
VIT_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "proj_hidden_dim", "proj_dim")


def build_encoder(config: dict) -> Encoder:
    """The encoder ``encoder.model`` describes (a model file's ``config["model"]``); files written before ``arch``
    existed are ViTs with the ViT fields alone."""
    arch = config.get("arch", "vit")
    if arch == "vit":
        return MoCoViT(**{k: config[k] for k in VIT_FIELDS if k in config})
    if arch == "resnet":
        return MoCoResNet(img_size=config["img_size"], proj_hidden_dim=config["proj_hidden_dim"],
                          proj_dim=config["proj_dim"], **config["resnet"])
    raise RcgError(f"unknown encoder arch {arch!r} (encoder.model.arch: vit or resnet)")


def normalize_for_encoder(x01: torch.Tensor, input_size: int) -> torch.Tensor:
    """ImageNet mean/std, then bicubic resize (no antialias) only if needed: RCG's order, resize after normalising."""
    mean = x01.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x01.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x01 - mean) / std
    if tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    return x


def standardize(r: torch.Tensor) -> torch.Tensor:
    """Per-sample standardisation over features with torch's default (unbiased) std, as RCG does."""
    return (r - r.mean(dim=-1, keepdim=True)) / r.std(dim=-1, keepdim=True)


@torch.no_grad()
def represent(model: Encoder, images01: torch.Tensor, input_size: int | None = None,
              autocast_dtype: torch.dtype | None = None, return_features: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RCG representation r_hat [B, proj_dim] (fp32) of images in [0,1].

    The encoder is frozen, so it is forced into eval mode: the projector BNs must use their running stats.
    With ``return_features``: (r_hat, the pre-projector feature [B, embed_dim], the projector output
    [B, proj_dim] before standardisation), so a check can see each step of docs/official.md §1.2.
    """
    model.eval()
    x = normalize_for_encoder(images01.float(), input_size or model.input_size)
    amp = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        feature = model.features(x)
        projected = model.project(feature)
    rep = standardize(projected.float())
    return (rep, feature.float(), projected.float()) if return_features else rep


def image_rep(encoder: Encoder, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """The representation [D] of a uint8 [H, W, 3] image, as the stores compute it."""
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float().div(255)
    return represent(encoder, x, input_size=encoder.input_size)[0]


def load_strict(model: nn.Module, sd: dict, source: str) -> None:
    """Strict load with a one-line account of missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {list(sd[k].shape)} vs model {list(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    problems = [f"{len(items)} {what} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise RcgError(f"{source} does not match the encoder architecture: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True)


def _from_file(payload: dict, path: str | Path) -> Encoder:
    """The frozen encoder of an "rcg-encoder" model file (``load_model("encoder", path)``)."""
    model = build_encoder(payload["config"]["model"])
    load_strict(model, payload["state_dict"], str(path))
    return model.requires_grad_(False)


register_model_kind("encoder", MODEL_FORMAT, _from_file)
