"""Representation Diffusion Model: RCG's SimpleMLP denoiser, its class embedder, and the official-checkpoint import.

Module names follow the official code so ``SimpleMLP.state_dict()`` keys equal the official
``model.diffusion_model.*`` keys with the prefix stripped (docs/official.md §2.1, §2.5).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from pipeline.core.artifacts import file_sha256, load_checkpoint, register_model_kind, weights_sha256
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.models.ema import EMA
from pipeline.models.mocov3_weights import import_mocov3_state_dict, infer_vit_config

MODEL_FORMAT = "rcg-rdm"  # data/models/rdm.pt, trained here or imported
# The noise schedule every official RDM is trained for (rdm.diffusion's defaults).
OFFICIAL_SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}


def ldm_betas(timesteps: int, linear_start: float, linear_end: float) -> np.ndarray:
    """LDM's "linear" schedule: betas linear in sqrt(beta), in float64 (what the diffusion and the official
    checkpoint check both compute)."""
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2


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
    (``whitening``); ``forward(z_t, t, y) -> z0_hat`` runs in that space, :func:`pipeline.samplers.diffusion.sample_reps` maps back.

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
# Official checkpoint import

NET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
COND_PREFIX = "cond_stage_model."
IGNORED_PREFIXES = ("pretrained_encoder.",)
IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}


def ema_shadow_name(param_name: str) -> str:
    """LitEma's buffer name for a SimpleMLP param: 'diffusion_model.' + name with every dot removed."""
    return EMA_PREFIX + ("diffusion_model." + param_name).replace(".", "")


def _few(keys: list[str], n: int = 5) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise RcgError(f"official RDM checkpoint lacks {key!r}; cannot infer the architecture")
    return tuple(sd[key].shape)


def _check_state(what: str, state: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> None:
    """RcgError naming missing/unexpected keys and shape mismatches (counts and the first few)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"missing {_few(missing)}"] if missing else []) + \
               ([f"unexpected {_few(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch {_few(wrong, 3)}"] if wrong else [])
    if problems:
        raise RcgError(f"official RDM checkpoint: {what} does not fit the inferred SimpleMLP: " + "; ".join(problems))


def convert_official_rdm(sd: Mapping[str, Any]) -> tuple[dict, dict, dict | None, dict]:
    """Split an official RDM state dict into (RDM config, net state, EMA net state or None, cond state).

    Works on anything with ``.shape`` (meta tensors included) except the stored ``betas``, which must be
    real values: they are checked against our schedule.
    """
    if not any(k.startswith(NET_PREFIX) for k in sd):
        raise RcgError(f"not an official RDM checkpoint: no '{NET_PREFIX}*' keys "
                       f"(first keys: {', '.join(list(sd)[:5])})")
    net = {k[len(NET_PREFIX):]: v for k, v in sd.items() if k.startswith(NET_PREFIX)}
    shadows = {k: v for k, v in sd.items() if k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS}
    cond = {k[len(COND_PREFIX):]: v for k, v in sd.items() if k.startswith(COND_PREFIX)}
    other = [k for k in sd if not k.startswith((NET_PREFIX, EMA_PREFIX, COND_PREFIX) + IGNORED_PREFIXES)
             and k not in IGNORED_KEYS]
    if other:
        raise RcgError(f"official RDM checkpoint has unexpected keys {_few(other)}")
    if "betas" in sd:
        ours = torch.tensor(ldm_betas(**OFFICIAL_SCHEDULE), dtype=torch.float32)
        if tuple(sd["betas"].shape) != tuple(ours.shape) or not torch.allclose(sd["betas"].float(), ours, rtol=1e-4):
            raise RcgError("official RDM checkpoint's 'betas' differ from our schedule "
                           "(T=1000, sqrt-linear 0.0015..0.0195)")

    blocks = {int(m.group(1)) for k in net if (m := re.match(r"res_blocks\.(\d+)\.", k))}
    class_cond = any(".context_layers." in k for k in net)
    n_classes, embed_dim = _shape(cond, "embedding.weight")
    config = dict(class_cond=class_cond, n_classes=n_classes,
                  in_channels=_shape(net, "input_proj.weight")[1],
                  time_embed_dim=_shape(net, "time_embed.0.weight")[0],
                  model_channels=_shape(net, "input_proj.weight")[0],
                  bottleneck_channels=_shape(net, "res_blocks.0.in_layers.2.weight")[0],
                  out_channels=_shape(net, "out.2.weight")[0],
                  num_res_blocks=max(blocks) + 1 if blocks else 0, embed_dim=embed_dim)
    if not class_cond and n_classes != 1:
        raise RcgError(f"official RDM checkpoint: unconditional MLP but {n_classes} class embeddings")
    with torch.device("meta"):
        ref = RDM(**config)
    _check_state("model.diffusion_model.*", net, ref.net.state_dict())
    _check_state("cond_stage_model.*", cond, ref.cond_stage_model.state_dict())

    ema = None
    if shadows:
        names = {ema_shadow_name(n): n for n, _ in ref.net.named_parameters()}
        unexpected = [k for k in shadows if k not in names]
        if unexpected:
            raise RcgError(f"official RDM checkpoint: unexpected EMA shadows {_few(unexpected)}")
        ema = {names[k]: v for k, v in shadows.items()}
        _check_state("model_ema.*", ema, dict(ref.net.named_parameters()))
    return config, net, ema, cond


def read_official_rdm(path: str | Path) -> Mapping[str, Any]:
    """The state dict inside an official RCG RDM checkpoint (``{'model' or 'state_dict': ..., 'args':
    Namespace, ...}``), loaded with weights_only=True and only ``argparse.Namespace`` allow-listed."""
    ckpt = load_checkpoint(path, safe_globals=(argparse.Namespace,))
    if not isinstance(ckpt, dict):
        raise RcgError(f"{path} is not an official RDM checkpoint (holds a {type(ckpt).__name__})")
    sd = ckpt.get("model", ckpt.get("state_dict"))
    if not isinstance(sd, Mapping):
        raise RcgError(f"{path} is not an official RDM checkpoint: no 'model' or 'state_dict' entry "
                       f"(top-level keys: {', '.join(map(str, list(ckpt)[:8]))})")
    return sd


def load_official_rdm(path: str | Path, sd: Mapping[str, Any] | None = None) -> tuple[dict, dict, dict | None, dict]:
    """Read an official RCG RDM checkpoint (or convert its already-read state dict ``sd``).

    Returns (config for ``RDM(**config)``, net state, EMA net state or None, cond-embedder state).
    The frozen encoder and the schedule buffers are dropped (the stored betas are checked).
    """
    try:
        return convert_official_rdm(read_official_rdm(path) if sd is None else sd)
    except RcgError as exc:
        raise RcgError(f"{path}: {exc}") from None


def official_rdm_encoder(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The MoCo v3 encoder an official RDM embeds (``pretrained_encoder.*``: the weights it was trained on),
    with MoCoViT key names; empty if the file does not carry it."""
    prefix = IGNORED_PREFIXES[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


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


def official_rdm(path: str | Path, device: torch.device | str = "cpu",
                 sd: Mapping[str, Any] | None = None) -> tuple[RDM, EMA | None, dict, Mapping[str, Any]]:
    """An official RCG RDM file as a model, with nothing else to check against: (RDM on ``device`` in eval mode
    with the file's raw weights, its EMA or None, ``RDM(**config)``'s config, the file's state dict). RCG samples
    with the EMA: ``ema.copy_to(model.net)``. The one place an official RDM becomes a model."""
    sd = read_official_rdm(path) if sd is None else sd
    config, net_sd, ema_sd, cond_sd = load_official_rdm(path, sd)
    model = RDM(**config)
    model.net.load_state_dict(net_sd)
    model.cond_stage_model.load_state_dict(cond_sd)
    model.to(device)
    ema = None
    if ema_sd is not None:
        ema = EMA(model.net)  # evaluated, never updated: the decay does not matter
        ema.load_state_dict(ema_sd)
    return model.eval(), ema, config, sd


def load_official_rdm_model(path: Path, ours: dict, whiten_power: float, schedule: Mapping[str, Any],
                            store_identity: dict, store_name: str,
                            device: torch.device) -> tuple[RDM, EMA | None, dict, dict]:
    """An official RCG RDM file as a ready model: (RDM on ``device``, its EMA or None, ``RDM(**config)``'s
    config, a summary naming the file and the encoder check), after checking that it fits ``ours`` (the
    ``RDM(**kwargs)`` of ``rdm.model``: :func:`rdm_kwargs`) with ``whiten_power`` 0, that ``schedule`` (the
    ``rdm.diffusion`` fields) is the official one and that it was trained on the encoder the store
    (``store_identity``) was made with."""
    sd = read_official_rdm(path)
    config = load_official_rdm(path, sd)[0]
    diffs = [f"{k} {ours[k]} (file: {config[k]})" for k in config if ours[k] != config[k]]
    if whiten_power:
        diffs.append(f"whiten_power {whiten_power} (official RDMs run on the raw reps: 0)")
    if diffs:
        raise RcgError(f"rdm.checkpoint {path} does not match rdm.model: {', '.join(diffs)}")
    if dict(schedule) != OFFICIAL_SCHEDULE:  # load_official_rdm checked the file's betas against this schedule
        raise RcgError(f"rdm.checkpoint {path} uses the official schedule (T=1000, 0.0015..0.0195); "
                       "rdm.diffusion must keep its defaults")
    encoder_check = check_official_encoder(official_rdm_encoder(sd), store_identity, store_name, path)
    model, ema, config, _ = official_rdm(path, device, sd)
    if ema is None:
        log(f"warning: {path} has no EMA weights; evaluating its raw weights")
    return model, ema, config, {"source": "official", "checkpoint": str(path), "sha256": file_sha256(path),
                                "encoder_check": encoder_check}


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
    ["diffusion"]`` is its schedule: ``pipeline.samplers.diffusion.GaussianDiffusion(**...)``."""
    config = payload["config"]
    model = RDM(**config["model"])
    if not any(k.startswith("whitening.") for k in payload["state_dict"]):
        raise RcgError(f"{path} predates RDM files that carry their whitening map; rerun train_rdm")
    model.load_state_dict(payload["state_dict"])
    if use_ema and "ema_state_dict" in payload:
        model.net.load_state_dict({k: v for k, v in payload["ema_state_dict"].items() if k != "num_updates"})
    return model


register_model_kind("rdm", MODEL_FORMAT, _from_file)
