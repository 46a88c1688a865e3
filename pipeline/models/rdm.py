"""Representation Diffusion Model: RCG's SimpleMLP denoiser, its class embedder, the whitening map and the schedule
(the official checkpoint import is :mod:`pipeline.models.official.rdm`).

Module names follow the official code so ``SimpleMLP.state_dict()`` keys equal the official
``model.diffusion_model.*`` keys with the prefix stripped (docs/official.md §2.1, §2.5).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.core.artifacts import register_model_kind
from pipeline.core.errors import RcgError

MODEL_FORMAT = "rcg-rdm"  # data/models/rdm.pt, trained here or imported
def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the raw integer t (not rescaled), cos first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Start a residual branch / the output at zero, so the initial net is identity-like."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Pre-LN MLP residual block, with additive timestep (and optional class-context) embedding."""

    def __init__(self, channels: int, mid_channels: int, emb_channels: int, dropout: float,
                 use_context: bool = False, context_channels: int = 512):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, mid_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, mid_channels))
        self.use_context = use_context
        if use_context:
            self.context_layers = nn.Sequential(nn.SiLU(), nn.Linear(context_channels, mid_channels))
        self.out_layers = nn.Sequential(nn.LayerNorm(mid_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Linear(mid_channels, channels)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)
        if self.use_context:
            h = h + self.context_layers(context)
        return x + self.out_layers(h)


class SimpleMLP(nn.Module):
    """RCG's RDM denoiser: predicts x0 from (x_t, t[, context]) for a flat representation vector."""

    def __init__(self, in_channels: int = 256, time_embed_dim: int = 256, model_channels: int = 1536,
                 bottleneck_channels: int = 1536, out_channels: int = 256, num_res_blocks: int = 12,
                 dropout: float = 0.0, use_context: bool = False, context_channels: int = 512):
        super().__init__()
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([
            ResBlock(model_channels, bottleneck_channels, time_embed_dim, dropout, use_context, context_channels)
            for _ in range(num_res_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(model_channels, eps=1e-6), nn.SiLU(),
                                 zero_module(nn.Linear(model_channels, out_channels)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B,C] or the official [B,C,1,1] (output has the input's rank); t: [B] long; context: [B,D]."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if context is not None:
            context = context.flatten(1)
        h = self.input_proj(x.flatten(1))  # flatten(1), unlike the official squeeze(), keeps B=1 intact
        for block in self.res_blocks:
            h = block(h, emb, context)
        h = self.out(h)
        return h.view(h.shape + (1,) * (x.dim() - 2))


class ClassEmbedder(nn.Module):
    """Learned class embedding used as the RDM context (LDM's ClassEmbedder, output [B, embed_dim])."""

    def __init__(self, n_classes: int, embed_dim: int = 512):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding(y)


class RepWhitening(nn.Module):
    """The affine map between the store's representation space and the space the diffusion runs in:
    z = c L^-p V^T (x - mean), the reps in the PCA basis of their covariance V L V^T with principal direction i
    scaled by lambda_i^-p, and back x = V L^p z / c + mean. Off (the reps pass untouched, as official RDMs take
    them) until ``fit`` with p > 0.

    Why: small, briefly trained encoders give reps whose covariance spans four orders of magnitude (the top 10
    of 256 directions hold >90% of the variance). The x0 loss then barely sees the weak directions, an
    under-trained RDM predicts their mean, and its samples come out with their variance wrong. A partial
    whitening evens the spectrum out without making the top directions as weak as the tail.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("active", torch.tensor(False))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("forward_map", torch.eye(dim))
        self.register_buffer("inverse_map", torch.eye(dim))
        self.is_active = False  # a host copy of ``active``: no device sync per step
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "is_active", bool(module.active)))

    @torch.no_grad()
    def fit(self, mean: torch.Tensor, cov: torch.Tensor, power: float, eps: float) -> None:
        """Fit to the reps' ``mean`` and ``cov``: L's eigenvalues floored at ``eps`` x their mean, c chosen so that
        the mapped reps have unit mean variance (the scale the noise schedule is made for). ``power`` 0 turns
        the map off: no centring either, exactly the official input."""
        self.is_active = power > 0
        self.active.fill_(self.is_active)
        if not self.is_active:
            self.mean.zero_()
            self.forward_map.copy_(torch.eye(len(self.mean)))
            self.inverse_map.copy_(torch.eye(len(self.mean)))
            return
        lam, vecs = torch.linalg.eigh(cov.double().cpu())
        lam = lam.clamp_min(0)
        scale = lam.clamp_min(eps * lam.mean()) ** power
        scale = scale * (lam / scale ** 2).mean().sqrt()
        self.mean.copy_(mean.double().cpu().to(self.mean))
        self.forward_map.copy_((vecs / scale).T.to(self.forward_map))
        self.inverse_map.copy_((vecs * scale).to(self.inverse_map))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.forward_map.T if self.is_active else x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.inverse_map.T + self.mean if self.is_active else z


class RDM(nn.Module):
    """SimpleMLP (``net``) + ClassEmbedder (``cond_stage_model``) + the map into the diffusion's space
    (``whitening``); ``forward(z_t, t, y) -> z0_hat`` runs in that space,
    :func:`pipeline.samplers.diffusion.sample_reps` maps back.

    Unconditional (``class_cond=False``): as in the official code the embedder has a single row (label 0)
    that the MLP never reads, so ``y`` is ignored and ``n_classes`` is unused.
    """

    def __init__(self, class_cond: bool = False, n_classes: int = 1000, in_channels: int = 256,
                 time_embed_dim: int = 256, model_channels: int = 1536, bottleneck_channels: int = 1536,
                 out_channels: int = 256, num_res_blocks: int = 12, dropout: float = 0.0, embed_dim: int = 512):
        super().__init__()
        self.class_cond = class_cond
        self.net = SimpleMLP(in_channels, time_embed_dim, model_channels, bottleneck_channels, out_channels,
                             num_res_blocks, dropout, use_context=class_cond, context_channels=embed_dim)
        self.cond_stage_model = ClassEmbedder(n_classes if class_cond else 1, embed_dim)
        self.whitening = RepWhitening(in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        context = self.cond_stage_model(y) if self.class_cond else None
        return self.net(x, t, context)


# ---------------------------------------------------------------------------------------------------
# Our model files (MODEL_FORMAT, written by stages/train_rdm.py)

def rdm_kwargs(model_params) -> dict:
    """``RDM(**kwargs)`` from the ``rdm.model`` params section (read by attribute); the official bottleneck
    equals the width, and an unconditional RDM keeps one (unread) class row."""
    m = model_params
    return dict(class_cond=m.class_cond, n_classes=m.num_classes if m.class_cond else 1,
                in_channels=m.in_channels, time_embed_dim=m.time_embed_dim, model_channels=m.model_channels,
                bottleneck_channels=m.model_channels, out_channels=m.in_channels,
                num_res_blocks=m.num_res_blocks, dropout=m.dropout, embed_dim=m.context_channels)


def _from_file(payload: dict, path: str | Path, use_ema: bool = True) -> RDM:
    """The RDM of an "rcg-rdm" model file (``load_model("rdm", path, use_ema=...)``); the MLP carries the EMA
    weights (what RCG samples with) unless ``use_ema`` is False or the file has none. ``payload["config"]
    ["diffusion"]`` is its schedule: ``pipeline.models.diffusion.GaussianDiffusion(**...)``."""
    config = payload["config"]
    model = RDM(**config["model"])
    if not any(k.startswith("whitening.") for k in payload["state_dict"]):
        raise RcgError(f"{path} predates RDM files that carry their whitening map; rerun train_rdm")
    model.load_state_dict(payload["state_dict"])
    if use_ema and "ema_state_dict" in payload:
        model.net.load_state_dict({k: v for k, v in payload["ema_state_dict"].items() if k != "num_updates"})
    return model


register_model_kind("rdm", MODEL_FORMAT, _from_file)
