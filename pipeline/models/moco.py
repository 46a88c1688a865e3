"""MoCo v3 pretraining of the encoder (Chen, Xie, He, ICCV 2021): symmetric InfoNCE between a predictor on the
base encoder (ViT or ResNet) and a momentum encoder, with MoCo v3's asymmetric augmentation pair."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.encoder import Encoder, MoCoViT, normalize_for_encoder
from pipeline.models.mlp import build_mlp


def momentum_at(progress: float, base_m: float = 0.99) -> float:
    """Half-cycle cosine increase of the momentum from ``base_m`` (progress 0) to 1 (progress 1)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base_m)


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Keys from every rank (no gradient flows through all_gather; keys need none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE of each query against all keys of the global batch; positives sit at this rank's offset.
    Scaled by 2T as in MoCo v3, so the gradient magnitude does not depend on T."""
    q = F.normalize(q, dim=1)
    k = F.normalize(concat_all_gather(k), dim=1)
    logits = q @ k.t() / T
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * T)


class MoCoV3(nn.Module):
    """Base encoder + predictor trained against a momentum copy; keys match the official ``MoCo_ViT`` /
    ``MoCo_ResNet``."""

    def __init__(self, base_encoder: Encoder, dim: int = 256, mlp_dim: int = 4096, T: float = 0.2,
                 stop_grad_conv1: bool = True):
        super().__init__()
        self.T = T
        vit = isinstance(base_encoder, MoCoViT)
        if vit:  # MoCo v3's ViT recipe freezes the random patch projection: it stabilises training.
            base_encoder.patch_embed.requires_grad_(not stop_grad_conv1)
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder).requires_grad_(False)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)  # MoCo v3: no last BN on the ResNet's

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        for pb, pm in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            pm.mul_(m).add_(pb.detach(), alpha=1.0 - m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """Symmetric loss for two views in [0,1]; preprocessed exactly as ``represent`` does."""
        size = self.base_encoder.input_size
        x1, x2 = normalize_for_encoder(x1, size), normalize_for_encoder(x2, size)
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
        return contrastive_loss(q1, k2, self.T) + contrastive_loss(q2, k1, self.T)
