"""RCG's two passes (docs/official.md §2.4, §3.3): the RDM samples a representation, the pixel generator decodes
tokens conditioned on it, the VQGAN turns the tokens into pixels. One function, :func:`generate`, serves every
setting the comparison needs:

- ``rcg`` / ``rcg_cfg``: RDM reps (DDIM, the file's EMA weights, its whitening undone) -> the ``rep`` generator,
  without / with classifier-free guidance; a class-conditional RDM gets the requested class ids (class-cond RCG,
  the pixel generator is the same);
- ``oracle``: the stored reps of real images -> the ``rep`` generator;
- ``baseline``: the unconditional (``none``) generator;
- ``class`` / ``cluster``: class or cluster ids -> their generators.

Reproducible by construction: a batch of samples is a pure function of its inputs and one seeded generator,
which feeds the RDM noise and then the token sampling. The sample stage makes each store chunk one batch seeded
by (seed, the chunk's global index), so the samples do not depend on which rank made them, or when: ranks that
split the chunks, and a resumed run, produce exactly what one uninterrupted process does.

Pixels: the decoder output x (about [0, 1]) becomes uint8 as the official code saves PNGs,
``clip(x * 255, 0, 255)`` then a cast: truncated, not rounded.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core.artifacts import file_sha256, is_model_file, load_checkpoint, load_model, weights_sha256
from pipeline.core.config import RdmSample, SampleSetting
from pipeline.core.errors import RcgError
from pipeline.core.runtime import autocast as runtime_autocast
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.samplers.diffusion import sample_reps
from pipeline.gen.masked_decoding import decode_tokens
from pipeline.models.official.mocov3 import import_mocov3_state_dict
from pipeline.models.mage import MAGE
from pipeline.models.official.mage import convert_official_mage, official_layout
from pipeline.models.rdm import RDM
from pipeline.models.official.rdm import official_rdm, official_rdm_encoder
from pipeline.models.vqgan import VQGAN
from pipeline.models.official.vqgan import load_official_vqgan
from pipeline.core.rng import purpose, seeded_generator

OFFICIAL_REP_DIM = 256  # MoCo v3's projector output: the rep size of every official RCG file


# ------------------------------------------------------------------------------------------------ models
@dataclass
class LoadedRdm:
    """An RDM file loaded for sampling, with the identity the compatibility checks compare."""
    model: RDM
    diffusion: GaussianDiffusion
    encoder: str | None  # weights_sha256 of the encoder whose reps it was trained on, when the file says
    sha256: str


@dataclass
class LoadedPixel:
    """A pixel-generator file loaded for sampling, with what the compatibility checks compare."""
    model: MAGE
    conditioning: str        # rep / none / class / cluster
    grid: tuple[int, int]    # token grid (h, w)
    codebook_size: int
    rep_dim: int | None
    num_labels: int | None   # classes / clusters a label generator knows
    tokenizer: str | None    # sha256 of the tokenizer model file its tokens came from, when the file says
    encoder: str | None      # weights_sha256 of the encoder its reps came from, when the file says
    sha256: str
    tokenizer_weights: str | None = None  # weights_sha256 of the VQGAN an official file embeds
    label_counts: list[int] | None = None  # how often each label occurs in the training data, when the file says


@dataclass
class Models:
    """What one setting samples with, plus the identities the compatibility checks compare."""
    pixel: LoadedPixel
    tokenizer: VQGAN
    tokenizer_sha256: str
    rdm: LoadedRdm | None = None
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.tokenizer.quantize.embedding.weight.device

    @property
    def image_size(self) -> tuple[int, int]:
        f = self.tokenizer.downsample_factor
        return self.pixel.grid[0] * f, self.pixel.grid[1] * f


def load_rdm_any(path: str | Path, device: torch.device) -> LoadedRdm:
    """An "rcg-rdm" model file or an official RCG RDM checkpoint, in eval mode with its EMA weights."""
    ckpt = load_checkpoint(path, safe_globals=(argparse.Namespace,))
    if is_model_file(ckpt):
        model, payload = load_model("rdm", path)
        config = payload["config"]
        diffusion = GaussianDiffusion(**config["diffusion"])
        encoder = ((config.get("store") or {}).get("encoder") or {}).get("weights_sha256")
    else:
        sd = ckpt.get("model", ckpt.get("state_dict")) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise RcgError(f"{path} is neither an rcg-rdm model file nor an official RDM checkpoint")
        model, ema, _, _ = official_rdm(path, sd=sd)
        if ema is not None:
            ema.copy_to(model.net)  # RCG samples with the EMA weights
        embedded = official_rdm_encoder(sd)
        encoder = weights_sha256(import_mocov3_state_dict(embedded)) if embedded else None
        diffusion = GaussianDiffusion()
    return LoadedRdm(model.eval().to(device), diffusion.to(device), encoder, file_sha256(path))


def load_tokenizer_any(path: str | Path, device: torch.device) -> VQGAN:
    """An "rcg-tokenizer" model file or a raw VQGAN checkpoint (the official one), frozen, in eval mode."""
    ckpt = load_checkpoint(path)
    model = load_model("tokenizer", path)[0] if is_model_file(ckpt) else load_official_vqgan(path)
    return model.eval().requires_grad_(False).to(device)


def load_pixel_file(path: str | Path, device: torch.device) -> LoadedPixel:
    """An "rcg-pixel" model file (EMA weights when it has them) or an official rep-conditioned MAGE checkpoint
    (square grid; heads inferred for MAGE-B/L), with what the compatibility checks compare: ours record the
    stores they were trained on, an official file embeds its encoder and VQGAN, whose weights are hashed."""
    ckpt = load_checkpoint(path, safe_globals=(argparse.Namespace,))
    if is_model_file(ckpt):
        model, payload = load_model("pixel", path)
        config = payload["config"]
        tokens, reps = config.get("tokens") or {}, config.get("reps") or {}
        grid, tokenizer_file = tuple(config["grid"]), (tokens.get("tokenizer") or {}).get("sha256")
        encoder, tokenizer_weights = (reps.get("encoder") or {}).get("weights_sha256"), None
        counts = (config.get("labels") or {}).get("counts")
    else:
        sd = ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise RcgError(f"{path} is neither an rcg-pixel model file nor an official MAGE checkpoint")
        # LTH14/mage's unconditional file has no rep slot; our ``none`` generator keeps one it never reads, sized
        # as RCG's reps (256) so that the model file looks like any other baseline.
        rep_dim = None if official_layout(sd) == "rep" else OFFICIAL_REP_DIM
        try:
            config, state, embedded_encoder, embedded_vqgan = convert_official_mage(sd, rep_dim=rep_dim)
        except RcgError as exc:
            raise RcgError(f"{path}: {exc}") from None
        model = MAGE(**config)
        model.load_state_dict(state, strict=True)
        side = math.isqrt(model.seq_len)
        if side * side != model.seq_len:
            raise RcgError(f"{path}: {model.seq_len} tokens do not form a square grid")
        grid, tokenizer_file = (side, side), None
        encoder = weights_sha256(import_mocov3_state_dict(embedded_encoder)) if embedded_encoder else None
        tokenizer_weights, counts = weights_sha256(embedded_vqgan), None
    return LoadedPixel(model.eval().to(device).requires_grad_(False), model.conditioning, grid, model.codebook_size,
                 model.rep_dim, model.num_labels or None, tokenizer_file, encoder, file_sha256(path),
                 tokenizer_weights, [int(c) for c in counts] if counts else None)


def load_models(pixel: str | Path, tokenizer: str | Path, rdm: str | Path | None, device: torch.device) -> Models:
    """Load the files one setting needs (``rdm`` only for RDM reps); the tokenizer and the RDM ours or official."""
    models = Models(load_pixel_file(pixel, device), load_tokenizer_any(tokenizer, device), file_sha256(tokenizer),
                    load_rdm_any(rdm, device) if rdm is not None else None)
    models.hashes = {"pixel": models.pixel.sha256, "tokenizer": models.tokenizer_sha256,
                     **({"rdm": models.rdm.sha256} if models.rdm is not None else {})}
    return models


# --------------------------------------------------------------------------------------------- checks
def check_setting(name: str, setting: SampleSetting, models: Models, stored_reps: dict | None = None) -> None:
    """One-line RcgError before any sampling when the files do not belong together or the setting does not fit
    them. ``stored_reps`` ({"dim", "encoder"}) describes the reps store an oracle setting reads."""
    px, key = models.pixel, f"sample.settings.{name}"
    if px.conditioning != setting.generator:
        raise RcgError(f"{key}: needs the {setting.generator!r} pixel generator, the file is {px.conditioning!r}")
    if px.codebook_size != models.tokenizer.quantize.n_embed:
        raise RcgError(f"the pixel generator predicts {px.codebook_size} codes but the tokenizer has "
                       f"{models.tokenizer.quantize.n_embed}: they do not belong together")
    if px.tokenizer is not None and px.tokenizer != models.tokenizer_sha256:
        raise RcgError("the pixel generator was trained on tokens of another tokenizer file "
                       f"({px.tokenizer[:12]}... vs {models.tokenizer_sha256[:12]}...)")
    if px.tokenizer_weights is not None and px.tokenizer_weights != weights_sha256(models.tokenizer.state_dict()):
        raise RcgError("the official MAGE file embeds another VQGAN than the tokenizer given")
    tokens = px.grid[0] * px.grid[1]
    if setting.iterations > tokens:
        raise RcgError(f"{key}.iterations ({setting.iterations}) exceeds the {tokens} tokens of a "
                       f"{px.grid[0]}x{px.grid[1]} grid")
    if setting.guidance > 0 and setting.generator == "none":
        raise RcgError(f"{key}.guidance: the unconditional generator has nothing to guide towards; use 0")
    if setting.reps == "rdm":
        rdm = models.rdm
        if rdm is None:
            raise RcgError(f"{key}: RDM reps need an RDM file")
        dim = rdm.model.whitening.mean.numel()
        if dim != px.rep_dim:
            raise RcgError(f"the RDM samples {dim}-d reps but the pixel generator takes {px.rep_dim}-d ones")
        if rdm.encoder and px.encoder and rdm.encoder != px.encoder:
            raise RcgError("the RDM and the pixel generator were trained on reps of different encoders")
        if rdm.model.class_cond:
            _check_classes(key, setting.classes, rdm.model.cond_stage_model.embedding.num_embeddings, "RDM")
        elif setting.classes is not None:
            raise RcgError(f"{key}.classes: the RDM is unconditional; it takes no class ids")
    if setting.reps == "stored":
        if stored_reps is None:
            raise RcgError(f"{key}: stored reps need a reps store")
        if stored_reps["dim"] != px.rep_dim:
            raise RcgError(f"the reps store holds {stored_reps['dim']}-d reps but the pixel generator takes "
                           f"{px.rep_dim}-d ones")
        if stored_reps.get("encoder") and px.encoder and stored_reps["encoder"] != px.encoder:
            raise RcgError("the reps store and the pixel generator come from different encoders")
    if setting.generator in ("class", "cluster"):
        _check_classes(key, setting.classes, px.num_labels, f"{setting.generator} generator")


def _check_classes(key: str, classes: list[int] | None, known: int, what: str) -> None:
    if classes is not None and max(classes) >= known:
        raise RcgError(f"{key}.classes: id {max(classes)} is unknown to the {what} ({known} ids: 0..{known - 1})")


# ------------------------------------------------------------------------------------------ conditioning
def label_ids(setting: SampleSetting, models: Models) -> list[int] | None:
    """The ids a setting conditions on (its ``classes``, else all its model knows); None when it takes none."""
    if setting.generator in ("class", "cluster"):
        return setting.classes or list(range(models.pixel.num_labels))
    if setting.reps == "rdm" and models.rdm.model.class_cond:
        return setting.classes or list(range(models.rdm.model.cond_stage_model.embedding.num_embeddings))
    return None


def sample_labels(setting: SampleSetting, models: Models, num: int, seed: int) -> np.ndarray | None:
    """The label of each of ``num`` samples. Given ``classes`` (and a class-conditional RDM, whose file records
    no label counts) cycle through the ids in order, every id equally often (the official 50 per class); a label
    generator given no ``classes`` follows its training labels' frequencies exactly (stratified quantiles, in a
    seeded order), so uneven k-means clusters are generated as often as they occur in the data."""
    ids = label_ids(setting, models)
    if ids is None:
        return None
    counts = models.pixel.label_counts if setting.generator in ("class", "cluster") and not setting.classes else None
    if not counts:
        return np.asarray(ids, dtype=np.int64)[np.arange(num) % len(ids)]
    cdf = np.cumsum(counts, dtype=np.float64) / sum(counts)
    labels = np.minimum(np.searchsorted(cdf, (np.arange(num) + 0.5) / num, side="right"), len(counts) - 1)
    return labels[np.random.default_rng([seed, 11]).permutation(num)].astype(np.int64)


def oracle_rows(num_rows: int, num_samples: int, seed: int) -> np.ndarray:
    """Rows of the reps store the oracle setting conditions on: a seeded permutation, cycled past N."""
    perm = np.random.default_rng([seed, 7]).permutation(num_rows)
    return perm[np.arange(num_samples) % num_rows]


# --------------------------------------------------------------------------------------------- passes
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output [B, 3, H, W] (about [0, 1]) -> uint8 [B, H, W, 3]: clip(x * 255, 0, 255), truncated."""
    return (images.float() * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Generated:
    images: np.ndarray          # uint8 [B, H, W, 3]
    tokens: torch.Tensor        # [B, h, w]
    reps: np.ndarray | None     # float32 [B, D] the pixel generator was conditioned on
    labels: np.ndarray | None   # int64 [B] given to the RDM or the label generator


class _Clock:
    """Seconds per pass, added into ``timings`` (synchronising a GPU so each pass is charged its own time)."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device, self.last = timings, device, time.perf_counter()

    def __call__(self, key: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[key] = self.timings.get(key, 0.0) + now - self.last
        self.last = now


@torch.inference_mode()
def generate(models: Models, setting: SampleSetting, rdm_sampler: RdmSample, count: int,
             generator: torch.Generator, reps: torch.Tensor | None = None, labels: np.ndarray | None = None,
             timings: dict | None = None, bf16: bool = False) -> Generated:
    """``count`` images of one setting: RDM reps (unless ``reps`` are given: the oracle path) or ``labels``, then
    masked decoding, then the VQGAN. The RDM draws first from ``generator``, the decoding after it.
    ``timings`` (if given) accumulates seconds under "rdm", "decode" and "vqgan". ``bf16`` autocasts decoding
    and the VQGAN where bf16 is native (a GPU, or a CPU with AVX512-BF16 / AMX); the RDM runs fp32, as RCG's."""
    device = models.device
    clock = _Clock(timings, device)
    y = torch.as_tensor(labels, device=device) if labels is not None else None
    mage = models.pixel.model
    if setting.generator == "rep":
        if reps is None:
            rdm = models.rdm
            rdm_labels = y if rdm.model.class_cond else torch.zeros(count, dtype=torch.long, device=device)
            reps = sample_reps(rdm.model, rdm.diffusion, rdm_labels, steps=rdm_sampler.steps, eta=rdm_sampler.eta,
                               temperature=rdm_sampler.temperature, generator=generator)
            clock("rdm")
        reps = reps.to(device, torch.float32)
        slots = mage.condition(reps)
    else:
        slots = mage.condition(y, batch=count)  # class / cluster ids, or the none generator's fake_latent
    with runtime_autocast(bf16, device):
        tokens = decode_tokens(mage, slots, generator, num_iter=setting.iterations,
                               choice_temperature=setting.temperature, guidance=setting.guidance)
    tokens = tokens.view(count, *models.pixel.grid)
    clock("decode")
    with runtime_autocast(bf16, device):
        images = to_uint8(models.tokenizer.decode_indices(tokens))
    clock("vqgan")
    return Generated(images, tokens, reps.cpu().numpy() if setting.generator == "rep" else None, labels)


# -------------------------------------------------------------------------------------------- figures
def rep_rows(models: Models, setting: SampleSetting, rdm_sampler: RdmSample, reps: torch.Tensor, columns: int,
             generator: torch.Generator) -> np.ndarray:
    """Figure 6: each rep [R, D] decoded into ``columns`` images -> uint8 [R, columns, H, W, 3]."""
    out = generate(models, setting, rdm_sampler, len(reps) * columns, generator,
                   reps=reps.repeat_interleave(columns, dim=0)).images
    return out.reshape(len(reps), columns, *out.shape[1:])


def interpolation_rows(models: Models, setting: SampleSetting, rdm_sampler: RdmSample, f1: torch.Tensor,
                       f2: torch.Tensor, columns: int, seed: int) -> np.ndarray:
    """Figure 7: t f1 + (1 - t) f2 for t from 1 to 0 in ``columns`` steps, per pair (f1, f2 [P, D]) ->
    uint8 [P, columns, H, W, 3]. Every step replays one seeded stream, so along a row only the rep changes."""
    steps = []
    for t in torch.linspace(1, 0, columns).tolist():
        steps.append(generate(models, setting, rdm_sampler, len(f1), figure_generator(models.device, seed, 1),
                              reps=t * f1 + (1 - t) * f2).images)
    return np.stack(steps, axis=1)


def label_rows(models: Models, setting: SampleSetting, rdm_sampler: RdmSample, ids: list[int], columns: int,
               generator: torch.Generator) -> np.ndarray:
    """One row of ``columns`` samples per class / cluster id (through the label generator or a class-cond RDM)."""
    labels = np.repeat(np.asarray(ids, dtype=np.int64), columns)
    out = generate(models, setting, rdm_sampler, len(labels), generator, labels=labels).images
    return out.reshape(len(ids), columns, *out.shape[1:])


def chunk_generator(device: torch.device, seed: int, chunk: int) -> torch.Generator:
    """The stream of store chunk ``chunk``: the same in every setting, so rcg and rcg_cfg see the same RDM reps."""
    return seeded_generator(device, seed, purpose("sample.chunk", chunk))


def figure_generator(device: torch.device, seed: int, figure: int) -> torch.Generator:
    return seeded_generator(device, seed, purpose("sample.figure", figure))
