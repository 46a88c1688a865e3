"""MAGE pixel generator as RCG modifies it: a ViT encoder-decoder over VQGAN token ids, conditioned through
sequence position 0 (docs/official.md §3), its masked-token training loss, and the official-checkpoint import.

Module names follow the official code, so with ``grid_conv=0`` ``MAGE.state_dict()`` keys are the official
``model`` keys minus the parameters the official forward never reads and the frozen encoder / VQGAN it embeds (the
import, with those accounted for, is :mod:`pipeline.models.official.mage`). Iterative decoding lives beside this
file, in :mod:`pipeline.gen.masked_decoding`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.artifacts import register_model_kind
from pipeline.core.errors import RcgError

MODEL_FORMAT = "rcg-pixel"  # data/models/pixel-<conditioning>.pt, trained here or imported
CONDITIONINGS = ("rep", "none", "class", "cluster")
Conditioning = Literal["rep", "none", "class", "cluster"]
OFFICIAL_EXTRA_IDS = 1000  # the official vocabulary: codebook, 1000 unused "class" ids, [MASK] last

# Encoder width/depth/heads and decoder width/depth/heads (official MAGE-B/L; the small ones are ours, for the CPU).
MAGE_SIZES = {
    "mage_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                      decoder_num_heads=16),
    "mage_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
                       decoder_num_heads=16),
    "mage_small": dict(embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=128, decoder_depth=2,
                       decoder_num_heads=4),
}


class Attention(nn.Module):
    """Multi-head self-attention through SDPA. As in the official code, q k^T (here the whole attention) runs in
    fp32 with autocast off, so bf16/fp16 training does not overflow the logits."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        with torch.autocast(x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.to(v.dtype).transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block (timm 0.3.2 layout: norm1, attn, norm2, mlp; no drop path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GridConv(nn.Module):
    """A depthwise k x k convolution over the token grid, added residually; position 0 (the slot) passes
    through. Ours, not MAGE's: it gives the decoder the locality a short run cannot learn from attention alone
    (a positional encoding generator, as in CPVT; bench/RESULTS.md, "a local prior for the pixel generator")."""

    def __init__(self, dim: int, kernel: int, side: int):
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)  # PyTorch's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        grid = x[:, 1:].transpose(1, 2).reshape(b, c, self.side, self.side)
        return torch.cat([x[:, :1], x[:, 1:] + self.conv(grid).flatten(2).transpose(1, 2)], 1)


class BertEmbeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm, dropout (the official ``token_emb``)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions)[None])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_embeddings(self.position_ids[:, :ids.shape[1]])
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + pos))


class MlmLayer(nn.Module):
    """Output head: Linear, GELU, LayerNorm, then logits against the (detached) word embeddings plus a bias."""

    def __init__(self, feat_dim: int, word_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(feat_dim, word_dim)
        self.ln = nn.LayerNorm(word_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, n: int) -> torch.Tensor:
        """Logits of the first ``n`` ids only (the codebook): the official slices the full ones the same way."""
        h = self.ln(F.gelu(self.fc(x)))
        return h @ word_embeddings[:n].detach().T + self.bias[..., :n]


class MAGE(nn.Module):
    """MAGE (``mage_vit_*_patch16``) over ``seq_len`` token ids from a ``codebook_size`` codebook.

    ``vocab="official"``: codebook + 1000 + 1 ids, [MASK] last, position 0 holds id codebook + 76 (1100 for the
    VQGAN's 1024 codes); what official files need. ``"compact"``: codebook + 1 ids ([MASK] last), for ours.
    Whatever id position 0 holds, its embedding is overwritten by the conditioning slot (``latent_prior_proj``
    of the rep, of ``fake_latent``, or of a label embedding; see :meth:`condition`). ``grid_conv`` > 0 puts a
    :class:`GridConv` of that kernel before each decoder block (ours; 0, no convolution, is MAGE).
    """

    def __init__(self, codebook_size: int = 1024, seq_len: int = 256, rep_dim: int = 256,
                 conditioning: Conditioning = "rep", num_labels: int = 0,
                 vocab: Literal["official", "compact"] = "official",
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 768,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 mask_ratio_mu: float = 0.75, mask_ratio_std: float = 0.25, mask_ratio_min: float = 0.5,
                 mask_ratio_max: float = 1.0, rep_drop_prob: float = 0.1, label_smoothing: float = 0.1,
                 grid_conv: int = 0):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise RcgError(f"MAGE conditioning {conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        if conditioning in ("class", "cluster") and num_labels < 1:
            raise RcgError(f"MAGE conditioning {conditioning!r} needs num_labels >= 1")
        if not 0 < mask_ratio_min <= mask_ratio_mu <= mask_ratio_max <= 1:
            raise RcgError("MAGE mask ratios must satisfy 0 < min <= mu <= max <= 1")
        side = math.isqrt(seq_len)
        if grid_conv and (grid_conv % 2 == 0 or side * side != seq_len):
            raise RcgError(f"MAGE grid_conv {grid_conv}: needs an odd kernel and a square token grid "
                           f"(got {seq_len} tokens)")
        self.codebook_size, self.seq_len, self.rep_dim = codebook_size, seq_len, rep_dim
        self.conditioning, self.num_labels, self.vocab = conditioning, num_labels, vocab
        vocab_size = codebook_size + (OFFICIAL_EXTRA_IDS + 1 if vocab == "official" else 1)
        self.mask_id = vocab_size - 1
        self.slot_id = codebook_size + 1100 - 1024 if vocab == "official" else self.mask_id
        self.mask_ratio = (mask_ratio_mu, mask_ratio_std, mask_ratio_min, mask_ratio_max)
        self.num_dropped = math.ceil(seq_len * mask_ratio_min)  # token dropping: always <= the masked count
        self.rep_drop_prob, self.label_smoothing = rep_drop_prob, label_smoothing

        self.fake_latent = nn.Parameter(torch.zeros(1, rep_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + 1, decoder_embed_dim))
        self.token_emb = BertEmbeddings(vocab_size, embed_dim, seq_len + 1, dropout)
        self.latent_prior_proj = nn.Linear(rep_dim, embed_dim)
        if conditioning in ("class", "cluster"):
            self.label_emb = nn.Embedding(num_labels, rep_dim)  # labels live in rep space; the null is fake_latent
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, dropout)
                                            for _ in range(decoder_depth))
        self.decoder_grid_convs = nn.ModuleList(GridConv(decoder_embed_dim, grid_conv, side) if grid_conv
                                                else nn.Identity() for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.mlm_layer = MlmLayer(decoder_embed_dim, embed_dim, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init: N(0, 0.02) for embeddings and free parameters, xavier-uniform Linear, zero biases."""
        for p in (self.fake_latent, self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_from_codebook(self, codebook: torch.Tensor, generator: torch.Generator) -> None:
        """Word embeddings of the codebook ids from the tokenizer's code vectors [codebook_size, D]: centred, mapped
        to the width by a random orthogonal matrix, at the official init's scale (std 0.02). Codes that decode
        alike then start alike, on the input side and in the output head (which scores against these
        embeddings), so a short run need not learn from scratch what the tokenizer already knows. Ours, not
        MAGE's (official: random init)."""
        if codebook.shape[0] != self.codebook_size:
            raise RcgError(f"codebook_init: the tokenizer has {codebook.shape[0]} codes, MAGE {self.codebook_size}")
        weight = self.token_emb.word_embeddings.weight
        dim, width = codebook.shape[1], weight.shape[1]
        basis, _ = torch.linalg.qr(torch.randn(max(dim, width), min(dim, width), generator=generator))
        projection = basis.T if dim <= width else basis  # [dim, width], orthonormal rows or columns
        vectors = (codebook.float() - codebook.float().mean(0)) @ projection.to(codebook.device)
        weight[:self.codebook_size] = (vectors * 0.02 / vectors.std()).to(weight)

    # ------------------------------------------------------------------------------------------ conditioning
    def null_condition(self, batch: int) -> torch.Tensor:
        """The unconditional slot vector (``fake_latent``) for ``batch`` samples: the guidance branch."""
        return self.fake_latent.expand(batch, -1)

    def condition(self, c: torch.Tensor | None = None, null: torch.Tensor | None = None,
                  batch: int | None = None) -> torch.Tensor:
        """Slot vectors [B, rep_dim]: the rep ``c`` [B, rep_dim] (``rep``), a label embedding of ``c`` [B]
        (``class``/``cluster``), or ``fake_latent`` (``none``: ``c`` unused, give ``batch``); rows where the bool
        ``null`` [B] is set get ``fake_latent`` (the 10% drop in training, the unconditional half in guidance)."""
        if self.conditioning == "none":
            return self.null_condition(len(c) if c is not None else batch)
        if c is None:
            what = "rep" if self.conditioning == "rep" else "label"
            raise RcgError(f"MAGE conditioning {self.conditioning!r} needs a {what} per sample")
        if self.conditioning == "rep":
            if c.shape[-1] != self.rep_dim:
                raise RcgError(f"MAGE takes {self.rep_dim}-d reps, got {c.shape[-1]}-d")
            vec = c.to(self.fake_latent.dtype)
        else:
            vec = self.label_emb(c)
        return vec if null is None else torch.where(null[:, None], self.fake_latent, vec)

    # ------------------------------------------------------------------------------------------- network
    def forward(self, ids: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Codebook logits [B, L, codebook_size] for token ids [B, L] ([MASK] where unknown), slot vectors
        ``cond`` [B, rep_dim] and, in training, the dropped positions ``drop`` [B, L] (bool, ``num_dropped`` per
        row, all of them masked, as :meth:`sample_masks` draws them): the encoder never sees those; the
        decoder fills every masked slot with the decoded position 0."""
        b, n = ids.shape
        x = self.token_emb(torch.cat([ids.new_full((b, 1), self.slot_id), ids], 1))
        x = torch.cat([self.latent_prior_proj(cond)[:, None], x[:, 1:]], 1)  # after LN and dropout (official)
        keep = None
        if drop is not None:  # indices of position 0 and the kept positions, in order: static shapes (compile)
            kept = torch.cat([drop.new_zeros(b, 1), drop], 1).logical_not().to(torch.uint8)
            keep = kept.argsort(dim=1, descending=True, stable=True)[:, :n + 1 - self.num_dropped, None]
            x = x.gather(1, keep.expand(-1, -1, x.shape[-1]))
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        fill = x[:, :1].expand(b, n + 1, x.shape[-1])
        if keep is not None:
            x = fill.scatter(1, keep.expand(-1, -1, x.shape[-1]), x)
        masked = torch.cat([ids.new_zeros(b, 1, dtype=torch.bool), ids == self.mask_id], 1)
        x = torch.where(masked[..., None], fill, x) + self.decoder_pos_embed_learned
        for grid_conv, block in zip(self.decoder_grid_convs, self.decoder_blocks):
            x = block(grid_conv(x))
        x = self.mlm_layer(self.decoder_norm(x), self.token_emb.word_embeddings.weight, self.codebook_size)
        return x[:, 1:]

    # ------------------------------------------------------------------------------------------- masking
    def sample_masks(self, batch: int, generator: torch.Generator, device: torch.device | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masked [B, L], dropped [B, L], ratio []): one mask ratio m ~ TruncNormal(mu, std) on [min, max] for
        the whole batch, then per sample the ceil(L m) positions of smallest uniform noise are masked and the
        ceil(L min) smallest of those dropped. Exact counts (ranks, no ties); no host sync."""
        mu, std, lo, hi = self.mask_ratio
        device = device or self.fake_latent.device
        normal = torch.distributions.Normal(0.0, 1.0)
        a, b = (normal.cdf(torch.tensor((v - mu) / std, dtype=torch.float64)) for v in (lo, hi))
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        ratio = (mu + std * torch.special.ndtri(a.to(device) + u * (b - a).to(device))).clamp(lo, hi)
        rank = torch.rand(batch, self.seq_len, generator=generator, device=device).argsort(1).argsort(1)
        masked = rank < torch.ceil(self.seq_len * ratio)
        return masked, rank < self.num_dropped, ratio.float()


def masked_token_loss(model: MAGE, tokens: torch.Tensor, c: torch.Tensor | None, generator: torch.Generator | None,
                      net: nn.Module | None = None, *, masked: torch.Tensor | None = None,
                      dropped: torch.Tensor | None = None,
                      null: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAGE's training loss on codebook ids ``tokens`` [B, L] with conditioning input ``c`` (reps, labels or None):
    label-smoothed cross-entropy averaged over the masked positions only (dropped ones count as masked), with
    the slot dropped to ``fake_latent`` with probability ``rep_drop_prob`` per sample. All randomness comes from
    ``generator``. ``net`` is the module to call (a DDP / compiled wrapper of ``model``). -> (loss, accuracy of
    the argmax on the masked positions).

    ``null`` [B] bool (the samples whose slot is the null rep) and ``masked`` / ``dropped`` [B, L] bool (given
    together; ``dropped`` a subset of ``masked``), when given, are used instead of draws from ``generator`` (as
    ``pipeline.losses.diffusion.x0_loss`` takes ``t`` and ``noise``): an outside check can pin them. What is not
    given is drawn in the same order as without them (``null``, then the masks)."""
    if (masked is None) != (dropped is None):
        raise RcgError("masked_token_loss: give masked and dropped together")
    b, device = len(tokens), tokens.device
    if null is None:
        null = torch.rand(b, generator=generator, device=device) < model.rep_drop_prob
    cond = model.condition(c, null=null, batch=b)
    if masked is None:
        masked, dropped, _ = model.sample_masks(b, generator, device)
    logits = (model if net is None else net)(tokens.masked_fill(masked, model.mask_id), cond, dropped)
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none",
                         label_smoothing=model.label_smoothing).view(b, -1)
    weight = masked.float()
    count = weight.sum()
    accuracy = ((logits.argmax(-1) == tokens) & masked).sum() / count
    return (ce * weight).sum() / count, accuracy.detach()


# ---------------------------------------------------------------------------------------------------
# Our model files ("rcg-pixel", written by stages/train_pixel.py)

def mage_kwargs(model_params: Any, codebook_size: int, seq_len: int, rep_dim: int, conditioning: str,
                num_labels: int = 0) -> dict:
    """``MAGE(**kwargs)`` from the ``pixel.model`` params section and what the stores fix."""
    m = model_params
    return dict(codebook_size=codebook_size, seq_len=seq_len, rep_dim=rep_dim, conditioning=conditioning,
                num_labels=num_labels, vocab=m.vocab, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                decoder_num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
                mask_ratio_mu=m.mask_ratio_mu, mask_ratio_std=m.mask_ratio_std, mask_ratio_min=m.mask_ratio_min,
                mask_ratio_max=m.mask_ratio_max, rep_drop_prob=m.rep_drop_prob, label_smoothing=m.label_smoothing,
                grid_conv=m.grid_conv)


def _from_file(payload: dict, path: str | Path, use_ema: bool = True) -> MAGE:
    """MAGE from an "rcg-pixel" model file (``load_model("pixel", path, use_ema=...)``), with the EMA weights when
    the file has them and ``use_ema``. ``payload["config"]`` holds ``model`` (the kwargs), ``conditioning``,
    ``grid`` [h, w], ``labels`` (class/cluster: ``num_labels``, ``counts``; cluster: ``centroids``) and the
    identities of the stores it was trained on."""
    model = MAGE(**payload["config"]["model"])
    sd = payload["ema_state_dict"] if use_ema and "ema_state_dict" in payload else payload["state_dict"]
    model.load_state_dict({k: v for k, v in sd.items() if k != "num_updates"})
    return model


register_model_kind("pixel", MODEL_FORMAT, _from_file)
