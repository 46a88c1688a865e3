"""The ssl_judge: a second self-supervised encoder, used only to score samples where no labels are needed.

RCG's generators are conditioned on the encoder's representations, so that space favours them, and the label
judge needs labels. The ssl_judge learns without labels too (MoCo v3, pipeline.models.moco's loss and colour
augmentation) but as its own network, of the other family than the encoder where ``ssl_judge.model.arch`` is
``auto``: a residual CNN with a strided stem beside a ViT encoder, a small ViT beside a ResNet one; other weights,
seed and crop range either way. So its features are not the space RCG was conditioned on.
pipeline.eval.fidelity registers it with torch-fidelity as ``rcg-ssl-judge``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.artifacts import register_model_kind
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.models.encoder import MoCoViT
from pipeline.models.mlp import build_mlp
from pipeline.models.moco import contrastive_loss
from pipeline.models.resnet import BasicBlock

MODEL_FORMAT = "rcg-ssl-judge"


def scaled(x01: torch.Tensor, size: int) -> torch.Tensor:
    """An ssl_judge's input: images in [0, 1] at ``size`` (bilinear, antialiased, only when they differ), in
    [-1, 1]."""
    if tuple(x01.shape[-2:]) != (size, size):
        x01 = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x01 - 0.5) / 0.5


class SslJudgeNet(nn.Module):
    """A stride-2 3x3 conv stem, then ``stages`` basic residual blocks (block i: ``width * 2**i`` channels, stride 2 after
    the first), global average pooling (the scored features) and MoCo v3's projector. The strided stem costs a
    quarter of a full-resolution one (a MoCo step at 32 px: 0.1 s instead of 0.35 s for 64 images on 2 CPU cores)."""

    def __init__(self, img_size: int = 32, width: int = 16, stages: int = 3, proj_hidden_dim: int = 256,
                 proj_dim: int = 64):
        super().__init__()
        self.img_size = img_size
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
        for i in range(stages):
            c_out = width * 2 ** i
            layers.append(BasicBlock(c, c_out, 1 if i == 0 else 2))
            c = c_out
        self.body = nn.Sequential(*layers)
        self.feature_dim = c
        self.projector = build_mlp(2, c, proj_hidden_dim, proj_dim)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, feature_dim] of images in [0, 1], resized to ``img_size`` when they differ."""
        return self.body(scaled(x01, self.img_size)).mean(dim=(2, 3))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(x01))


class SslJudgeViT(nn.Module):
    """MoCo v3's ViT (:class:`pipeline.models.encoder.MoCoViT`: cls feature after the last LayerNorm, 3-layer
    projector) on images in [0, 1] scaled to [-1, 1], with MoCo v3's frozen random patch projection. The ssl_judge
    beside a convolutional encoder, so that the scored space is another architecture."""

    def __init__(self, img_size: int = 32, patch_size: int = 8, embed_dim: int = 64, depth: int = 4,
                 num_heads: int = 2, proj_hidden_dim: int = 256, proj_dim: int = 64):
        super().__init__()
        self.img_size = img_size
        self.vit = MoCoViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim)
        self.vit.patch_embed.requires_grad_(False)
        self.feature_dim = embed_dim

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """The cls feature [B, embed_dim] of images in [0, 1], resized to ``img_size`` when they differ."""
        return self.vit.features(scaled(x01, self.img_size))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.vit.project(self.features(x01))


SslJudgeBase = SslJudgeNet | SslJudgeViT
CNN_FIELDS = ("img_size", "width", "stages", "proj_hidden_dim", "proj_dim")


def model_config(params: Params) -> dict:
    """A model file's ``config["model"]``: ``ssl_judge.model`` at the views' crop size, ``arch`` resolved."""
    return {**params.ssl_judge.model.model_dump(), "img_size": params.views.crop, "arch": params.ssl_judge_arch()}


def build_ssl_judge(config: dict) -> SslJudgeBase:
    """The network a model file's ``config["model"]`` describes (``arch`` resolved); files written before ``arch``
    existed are CNNs."""
    arch = config.get("arch", "cnn")
    if arch not in ("cnn", "vit"):
        raise RcgError(f"unknown ssl_judge arch {arch!r} in a model file (cnn or vit)")
    if arch == "vit":
        return SslJudgeViT(img_size=config["img_size"], proj_hidden_dim=config["proj_hidden_dim"],
                           proj_dim=config["proj_dim"], **config["vit"])
    return SslJudgeNet(**{k: config[k] for k in CNN_FIELDS if k in config})


class SslJudgeMoCo(nn.Module):
    """MoCo v3 around an ssl_judge network: a predictor on the base network against a momentum copy."""

    def __init__(self, base: SslJudgeBase, proj_hidden_dim: int, proj_dim: int, T: float):
        super().__init__()
        self.T = T
        self.base = base
        self.momentum = copy.deepcopy(base).requires_grad_(False)
        self.predictor = build_mlp(2, proj_dim, proj_hidden_dim, proj_dim)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        for pb, pm in zip(self.base.parameters(), self.momentum.parameters()):
            pm.mul_(m).add_(pb.detach(), alpha=1.0 - m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """The symmetric InfoNCE loss of two view batches in [0, 1]."""
        with torch.no_grad():
            self.update_momentum(m)
            k1, k2 = self.momentum(x1), self.momentum(x2)
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        return contrastive_loss(q1, k2, self.T) + contrastive_loss(q2, k1, self.T)


def resized_crops(images: torch.Tensor, crop_min: float, generator: torch.Generator,
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A random-resized crop of every image of a uint8 batch [B, 3, R, R] at once (area fraction in [crop_min, 1],
    log-uniform aspect in ``ratio``, clipped to the image), resampled bilinearly back to R -> uint8 [B, 3, R, R].
    One ``grid_sample`` instead of a PIL crop per image: the images already sit in memory at the scored size."""
    b = len(images)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=images.device)

    area = uniform(crop_min, 1.0)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # fractions of the side
    cx, cy = (1 - w) * uniform(-1.0, 1.0), (1 - h) * uniform(-1.0, 1.0)  # centres in grid coordinates
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _from_file(payload: dict, path: str | Path) -> SslJudgeBase:
    """The frozen network of an "rcg-ssl-judge" model file (``load_model("ssl_judge", path)``)."""
    model = build_ssl_judge(payload["config"]["model"])
    model.load_state_dict(payload["state_dict"])
    return model.requires_grad_(False)


register_model_kind("ssl_judge", MODEL_FORMAT, _from_file)
