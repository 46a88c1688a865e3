"""MaskGIT-style VQGAN tokenizer used by MAGE/RCG (`vqgan_jax_strongaug.ckpt`), plus codebook tools to train one.

It is a PyTorch port of MaskGIT's JAX VQGAN, not taming-transformers: no attention, no quant convs, parameter-free
2x2 average-pool downsampling, bias-free residual convs, and a shortcut that convolves the residual branch when the
channel count changes. Submodule names follow the official port so ``state_dict()`` matches the released file key
for key. Images are in [0, 1] (no normalisation, no tanh at the output).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.artifacts import register_model_kind
from pipeline.core.errors import RcgError

MODEL_FORMAT = "rcg-tokenizer"  # data/models/tokenizer.pt, trained here or imported
ARCH = ["ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed"]  # what an official file fixes


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) as in the official model; gcd(32, c) groups lets tiny test widths (16, 48) work too."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        # MaskGIT: when channels change, the 1x1 shortcut acts on h (square weight) and x is dropped
        self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)
        return x + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        block_in = ch
        for mult in ch_mult:
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, out_ch: int, z_channels: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        up = []
        for i in reversed(range(len(ch_mult))):  # built top-down, stored by level index like the official port
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
            if i > 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through estimator; loss = codebook + beta * commitment
    (the non-legacy VQ-VAE form; the official port's legacy form swaps where beta goes, which only matters in training)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (b, h, w) order, as MAGE expects
        codes = self.embedding.weight
        dist = z_flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z_flat @ codes.t()
        indices = dist.argmin(1)
        z_q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, indices.view(b, h, w)

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: torch.Tensor, counts: torch.Tensor, min_count: int = 1,
                           generator: torch.Generator | None = None) -> int:
        """Move codes used < ``min_count`` times (counts accumulated since the last restart) onto random encoder
        outputs ``z_flat`` [N, embed_dim], plus a little noise so restarted codes do not coincide.
        Under DDP, call it with the same ``z_flat``/``counts``/generator seed on every rank (or broadcast after)."""
        dead = (counts.to(self.embedding.weight.device) < min_count).nonzero().flatten()
        if len(dead) == 0:
            return 0
        if len(z_flat) == 0:
            raise RcgError("restart_dead_codes needs at least one encoder output")
        device = generator.device if generator is not None else z_flat.device
        pick = torch.randint(len(z_flat), (len(dead),), generator=generator, device=device).to(z_flat.device)
        noise = torch.randn(len(dead), z_flat.shape[1], generator=generator, device=device).to(z_flat.device)
        new = z_flat[pick].float() + 0.01 * z_flat.float().std() * noise
        self.embedding.weight[dead] = new.to(self.embedding.weight)
        return len(dead)


class CodebookEMA(nn.Module):
    """Train a :class:`VectorQuantizer`'s codebook by EMA k-means (VQ-VAE appendix, VQ-VAE-2) instead of the
    codebook loss: each code moves to the running mean of the encoder outputs assigned to it. Adam moves a code by
    about ``lr`` per step, so loss-trained codes trail the encoder for thousands of steps; EMA codes keep up at
    once. Only training changes: the codebook stays ``quantize.embedding.weight`` (freeze it; the commitment term
    still trains the encoder), nearest-L2 lookup and the file format are the official ones."""

    def __init__(self, quantizer: VectorQuantizer, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("cluster_size", torch.ones(quantizer.n_embed))
        self.register_buffer("embed_sum", quantizer.embedding.weight.detach().float().clone())

    @torch.no_grad()
    def update(self, weight: torch.Tensor, z_flat: torch.Tensor, indices: torch.Tensor, reduce=lambda t: t) -> None:
        """One EMA step of the codebook ``weight`` from encoder outputs [N, D] and their codes [N];
        ``reduce`` sums a tensor over DDP ranks in place, so every rank makes the same step."""
        counts = torch.bincount(indices.flatten(), minlength=len(self.cluster_size)).to(self.cluster_size)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices.flatten(), z_flat.to(self.embed_sum))
        reduce(counts)
        reduce(sums)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()  # Laplace smoothing keeps never-used codes finite
        size = (self.cluster_size + self.eps) / (n + len(self.cluster_size) * self.eps) * n
        weight.copy_(self.embed_sum / size[:, None])

    @torch.no_grad()
    def reset(self, weight: torch.Tensor, codes: torch.Tensor) -> None:
        """After ``codes`` were restarted elsewhere: their statistics become one fresh assignment at the new place."""
        self.cluster_size[codes] = 1.0
        self.embed_sum[codes] = weight[codes].to(self.embed_sum)


def code_usage(indices: torch.Tensor, n_embed: int) -> torch.Tensor:
    """How often each code occurs in ``indices`` (any shape) -> LongTensor[n_embed]."""
    return torch.bincount(indices.flatten().long(), minlength=n_embed)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Share of codes used and perplexity exp(entropy) of the usage distribution (n_embed when uniform, 1 if one code)."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()
    return {"usage": (counts > 0).double().mean().item(), "perplexity": entropy.exp().item()}


class VQGAN(nn.Module):
    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, embed_dim: int = 256, n_embed: int = 1024, in_channels: int = 3,
                 out_ch: int = 3, beta: float = 0.25):
        super().__init__()
        if z_channels != embed_dim:
            raise RcgError(f"VQGAN has no quant convs: z_channels ({z_channels}) must equal embed_dim ({embed_dim})")
        ch_mult = tuple(ch_mult)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, out_ch, z_channels)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (z_q, codebook loss, indices[B, h, w])."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise RcgError(f"VQGAN input size {tuple(x.shape[-2:])} is not a multiple of {f}")
        return self.quantize(self.encoder(x))

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[2]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token grid [B, h, w] -> images (about [0, 1]; clamp before saving)."""
        return self.decode(self.quantize.embedding(indices).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, qloss, indices = self.encode(x)
        return self.decode(z_q), qloss, indices

    def get_last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.decoder.conv_out.weight


def model_kwargs(m) -> dict:
    """``VQGAN(**kwargs)`` (JSON-able) from the ``tokenizer.model`` params section."""
    return {**{k: getattr(m, k) for k in ARCH}, "ch_mult": list(m.ch_mult), "in_channels": 3, "out_ch": 3,
            "beta": m.beta}


def _from_file(payload: dict, path: str | Path) -> VQGAN:
    """The VQGAN of an "rcg-tokenizer" model file, trained or imported (``load_model("tokenizer", path)``)."""
    model = VQGAN(**payload["config"]["model"])
    model.load_state_dict(payload["state_dict"])
    return model


register_model_kind("tokenizer", MODEL_FORMAT, _from_file)
