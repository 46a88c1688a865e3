"""One schema for ``params.yaml``: every stage's section, validated before any work starts.

The defaults here *are* the default CPU run; ``params.yaml`` spells them out in full because DVC tracks
parameters by key (a test keeps the two equal). Presets (``pipeline/presets/*.yaml``) are partial overlays:
``rcg preset cifar10`` writes a complete params file from one of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, field_validator, model_validator)
from pydantic.fields import FieldInfo

from pipeline.core.errors import RcgError

PRESETS_DIR = Path(__file__).parents[1] / "presets"


class Section(BaseModel):
    """Strict: an unknown key or a wrong type is an error, never silently ignored."""
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


HOW_TO_RUN = {"how": "run"}


def how_to_run(default: Any) -> Any:
    """Mark a field as how to run, not what to compute (workers, cadences, threads): the one place that decides
    what every resume identity (pipeline.train.identity) and :func:`what_to_compute` leave out."""
    return Field(default, json_schema_extra=HOW_TO_RUN)


def _is_how_to_run(info: FieldInfo) -> bool:
    return isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("how") == "run"


# --------------------------------------------------------------------------------------------- data
MODEL_FILES = ("encoder", "tokenizer", "rdm", "pixel", "judge", "ssl_judge")  # what data/models/ holds


class Paths(Section):
    """Where artifacts live; stage outputs are fixed names under these roots (README, "Running stages")."""
    data: Path = Path("data")
    metrics: Path = Path("metrics")

    @property
    def listing(self) -> Path: return self.data / "folder_listing.json"
    @property
    def shards(self) -> Path: return self.data / "shards"
    @property
    def reps(self) -> Path: return self.data / "reps.zarr"
    @property
    def tokens(self) -> Path: return self.data / "tokens.zarr"
    @property
    def models(self) -> Path: return self.data / "models"

    def model_file(self, kind: str, conditioning: str | None = None) -> Path:
        """The model file a stage writes: ``models/<kind>.pt``, the pixel generators ``models/pixel-<conditioning>.pt``
        (``kind`` one of MODEL_FILES)."""
        if kind not in MODEL_FILES:
            raise ValueError(f"unknown model file kind {kind!r} (one of {', '.join(MODEL_FILES)})")
        if (kind == "pixel") != (conditioning is not None):
            raise ValueError("a pixel generator's file is named by its conditioning, and only a pixel generator's")
        return self.models / (f"pixel-{conditioning}.pt" if kind == "pixel" else f"{kind}.pt")
    @property
    def state(self) -> Path: return self.data / "state"
    @property
    def plots(self) -> Path: return self.metrics / "plots"


class BuiltinData(Section):
    """The synthetic shapes set of the default run: made by code, deterministic by seed."""
    num_train: PositiveInt = 4000
    num_val: NonNegativeInt = 500
    image_size: int = Field(32, ge=16, le=512)
    seed: int = 0


class Data(Section):
    source: Literal["builtin", "folder"] = "builtin"
    folder: Path | None = None       # ImageNet layout (<root>/<class>/*) or a flat folder of images
    val_folder: Path | None = None   # optional held-out split in the same layout
    # Where labels come from: auto = class subfolders when the folder has any, else none; folders = the subfolders
    # must be classes; none = no labels (nested folders are walked as plain folders; the built-in set drops its own).
    labels: Literal["auto", "folders", "none"] = "auto"
    # Without a val_folder, this fraction of the folder's images (a seeded draw, at least one) becomes the val split:
    # the held-out images of the evaluations and of compare's real row. 0: no val split.
    holdout: float = Field(0.1, ge=0, lt=1)
    builtin: BuiltinData = BuiltinData()

    @model_validator(mode="after")
    def _check(self) -> "Data":
        if self.source == "folder" and self.folder is None:
            raise ValueError("data.folder: required when data.source is 'folder'")
        return self


class Shard(Section):
    resize_short_side: PositiveInt | None = None  # e.g. 256 for ImageNet; None keeps bytes as they are
    reencode_format: Literal["png", "jpeg"] = "png"  # for converted/resized images; png is lossless
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_per_shard: PositiveInt = 2000
    max_shard_bytes: PositiveInt = 1 << 30
    min_side: PositiveInt = 8             # smaller images are rejected
    max_pixels: PositiveInt = 100_000_000  # larger images are rejected before decoding
    max_aspect: float = Field(20.0, gt=1.0)
    workers: NonNegativeInt = how_to_run(0)  # 0 = all cores


class Views(Section):
    """The deterministic views every store is computed on (pipeline.data.views)."""
    count: PositiveInt = 2   # V: view 0 = centre crop, 1 = its flip (if flip), more = seeded random crops
    resize: PositiveInt = 32  # short side before cropping (256 RDM-style, 292 MAGE-style on ImageNet)
    crop: PositiveInt = 32
    flip: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "Views":
        if self.crop > self.resize:
            raise ValueError(f"views.crop ({self.crop}) must be <= views.resize ({self.resize})")
        return self


# ------------------------------------------------------------------------------------------ encoder
class ResNetModel(Section):
    """MoCo v3's ResNet backbone (``encoder.model.arch: resnet``) in torchvision's layout: the official ResNet-50 is
    bottleneck, [3, 4, 6, 3], width 64, stem imagenet. The default is a small CNN for 32 px images."""
    block: Literal["basic", "bottleneck"] = "basic"
    layers: list[PositiveInt] = Field(default_factory=lambda: [1, 1, 1], min_length=1)
    width: PositiveInt = 32        # channels of the stem and the first stage (doubling per stage)
    stem: Literal["imagenet", "conv3x3"] = "conv3x3"  # imagenet: 7x7/2 conv + 3x3/2 max-pool
    stem_stride: PositiveInt = 1   # the conv3x3 stem's stride


class EncoderModel(Section):
    # Default: MoCo v3's ResNet backbone, a small CNN for 32 px images (the fields under `resnet`; the ViT's are then
    # unused): on the CPU budget it keeps RCG's order where the ViT's did not (bench/RESULTS.md, "why the defaults").
    # arch: vit is RCG's own encoder (the ViT fields: a CPU-sized one here; see presets for S/B/L).
    arch: Literal["vit", "resnet"] = "resnet"
    img_size: PositiveInt = 32
    patch_size: PositiveInt = 8
    embed_dim: PositiveInt = 64
    depth: PositiveInt = 4
    num_heads: PositiveInt = 2
    mlp_ratio: PositiveFloat = 4.0
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 256
    resnet: ResNetModel = ResNetModel()

    @model_validator(mode="after")
    def _check(self) -> "EncoderModel":
        if self.arch != "vit":
            return self
        if self.img_size % self.patch_size:
            raise ValueError(f"encoder.model.img_size ({self.img_size}) must be a multiple of patch_size")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError("encoder.model.embed_dim must be divisible by num_heads and by 4 (sin-cos)")
        return self


class EncoderTrain(Section):
    """MoCo v3 pretraining (stage pretrain_encoder). Defaults: a short CPU run (8 epochs of the built-in set);
    ImageNet MoCo v3 used 300 epochs, blr 1.5e-4."""
    epochs: PositiveInt = 8
    batch_size: PositiveInt = 64  # global: split evenly across DDP ranks
    blr: PositiveFloat = 6e-3    # lr = blr * batch_size / 256 (MoCo v3 rule): 1.5e-3 here, high for a short run
    weight_decay: float = Field(0.1, ge=0)
    warmup_epochs: NonNegativeInt = 1
    temperature: PositiveFloat = 0.2
    momentum: float = Field(0.96, ge=0, le=1)  # base of the cosine momentum schedule (-> 1 at the end)
    crop_min: float = Field(0.8, gt=0, le=1)     # RandomResizedCrop scale lower bound (0.08 on ImageNet)
    # Colour made unreliable between the two views (MoCo v3: hue 0.1, grayscale 0.2): the built-in set's colours are
    # random per image and its classes are shapes, so views that share a colour teach colour, not shape
    # (bench/RESULTS.md, "why the defaults").
    hue: float = Field(0.5, ge=0, le=0.5)        # ColorJitter hue range
    grayscale: float = Field(0.5, ge=0, le=1)    # RandomGrayscale probability
    bf16: bool = True  # bf16 autocast where native (GPU; AVX512-BF16/AMX CPU: RESULTS "bf16 on the CPU")
    workers: NonNegativeInt = how_to_run(2)
    checkpoint_every: PositiveInt = how_to_run(100)  # steps
    log_every: PositiveInt = how_to_run(10)


class Encoder(Section):
    checkpoint: Path | None = None  # official MoCo v3 file; None = pretrain our own (pretrain_encoder)
    model: EncoderModel = EncoderModel()
    train: EncoderTrain = EncoderTrain()


class Encode(Section):
    batch_size: PositiveInt = 256
    chunk_size: PositiveInt = 1024  # rows per Zarr chunk: the unit of resume and of rank splits
    workers: NonNegativeInt = how_to_run(2)
    bf16: bool = False              # bf16 autocast where native (GPU, AVX512-BF16 or AMX CPU)
    knn_k: PositiveInt = 20
    knn_images: NonNegativeInt = 10000  # k-NN probe (and random-init baseline) on this many images; 0 = all


# ---------------------------------------------------------------------------------------------- rdm
class RdmModel(Section):
    in_channels: PositiveInt = 256
    # Reps enter the diffusion in the PCA basis of the store's covariance, principal direction i scaled by
    # lambda_i^-p (lambda floored at whiten_eps x their mean; unit mean variance overall): p = whiten_power,
    # 0 = the official raw reps, 0.5 = full whitening. Saved in rdm.pt; pipeline.samplers.diffusion.sample_reps
    # maps back.
    whiten_power: float = Field(0.15, ge=0, le=0.5)
    whiten_eps: PositiveFloat = 1e-3
    time_embed_dim: PositiveInt = 256
    model_channels: PositiveInt = 512
    num_res_blocks: PositiveInt = 4
    dropout: float = Field(0.0, ge=0, lt=1)
    class_cond: bool = False
    num_classes: PositiveInt = 1000
    context_channels: PositiveInt = 512


class Diffusion(Section):
    timesteps: PositiveInt = 1000
    linear_start: PositiveFloat = 0.0015
    linear_end: PositiveFloat = 0.0195


class RdmTrain(Section):
    # Default: 8000 steps of 128 with warm-up + cosine (bench/RESULTS.md, "why the defaults").
    steps: PositiveInt = 8000
    batch_size: PositiveInt = 128    # global: split evenly across DDP ranks (official: 4 GPUs x 128 = 512)
    blr: PositiveFloat = 3.2e-5      # lr = blr * batch_size (official rule, no /256; official blr 1e-6)
    warmup_steps: NonNegativeInt = 100  # linear warm-up from 0 (official: none)
    cosine: bool = True              # half-cycle cosine decay to 0 after the warm-up (official --cosine_lr; off)
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    min_snr_gamma: PositiveFloat | None = 5.0  # x0 loss weighted by min(SNR(t), gamma) (Min-SNR); None = official
    bf16: bool = True  # bf16 autocast where native (GPU; AVX512-BF16/AMX CPU: RESULTS "bf16 on the CPU")
    checkpoint_every: PositiveInt = how_to_run(1000)
    log_every: PositiveInt = how_to_run(50)


class RdmSample(Section):
    """The RDM's DDIM sampler: ``steps`` DDIM steps, ``eta`` the share of fresh noise (0 = deterministic DDIM),
    ``temperature`` a factor on that noise. Official RCG: 250 steps, eta 1 (the ImageNet and cifar10 presets pin
    it); the default is deterministic DDIM at 100 steps (bench/RESULTS.md, "why the defaults")."""
    steps: PositiveInt = 100
    eta: float = Field(0.0, ge=0)
    temperature: PositiveFloat = 1.0


class RdmEval(Section):
    num_samples: PositiveInt = 2000  # M generated vs M real reps, each against the whole store (FD)
    lower_bound_draws: PositiveInt = 10  # the real-reps FD (lower bound) is averaged over this many draws
    batch_size: PositiveInt = 500
    knn_k: PositiveInt = 20          # class-cond: k-NN class agreement of samples with their requested class
    prc_k: PositiveInt = 3           # k of the k-NN precision/recall of samples (Kynkäänniemi et al.)


class Rdm(Section):
    checkpoint: Path | None = None  # official RDM file to evaluate/use instead of training
    model: RdmModel = RdmModel()
    diffusion: Diffusion = Diffusion()
    train: RdmTrain = RdmTrain()
    sample: RdmSample = RdmSample()
    eval: RdmEval = RdmEval()

    @model_validator(mode="after")
    def _check(self) -> "Rdm":
        if self.sample.steps > self.diffusion.timesteps:
            raise ValueError("rdm.sample.steps must be <= rdm.diffusion.timesteps")
        return self


# ---------------------------------------------------------------------------------------- tokenizer
class TokenizerModel(Section):
    """VQGAN architecture (pipeline.models.vqgan). Default: a tiny f=4 model (8x8 tokens on 32 px); the official
    one is ch 128, ch_mult [1,1,2,2,4], 2 blocks, 256-d codes, n_embed 1024.

    The default keeps one width: where the width changes, the official (MaskGIT) block drops its input and keeps
    only the GroupNorm'd branch, and at 16-32 channels GroupNorm is per channel, so each image's mean colour is
    lost there (bench/RESULTS.md, "why the defaults")."""
    ch: PositiveInt = 32
    ch_mult: list[PositiveInt] = [1, 1, 1]   # downsampling factor 2**(len-1): 4 -> 8x8 tokens on 32x32
    num_res_blocks: PositiveInt = 1
    z_channels: PositiveInt = 32
    embed_dim: PositiveInt = 32
    n_embed: PositiveInt = 1024              # codebook size (ids are stored as uint16)
    beta: float = Field(0.25, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "TokenizerModel":
        if self.n_embed > 65536:
            raise ValueError(f"tokenizer.model.n_embed ({self.n_embed}) exceeds 65536: "
                             "token ids are stored as uint16")
        return self


class TokenizerTrain(Section):
    """VQGAN training (stages/train_tokenizer.py); the codebook learns by EMA, so only the encoder, decoder and
    discriminator have optimisers. Default: small batches, many steps, the PatchGAN in the last quarter
    (bench/RESULTS.md, "why the defaults")."""
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 8           # global: split evenly across DDP ranks
    lr: PositiveFloat = 2e-3              # Adam(0.5, 0.9) for the VQGAN and the discriminator
    cosine: bool = False                  # half-cycle cosine decay of both lrs to 0 over the steps; False: constant
    disc_start: NonNegativeInt = 1500     # the PatchGAN's hinge loss joins from this step; >= steps: never
    disc_weight: float = Field(0.1, ge=0)
    disc_ndf: PositiveInt = 16            # PatchGAN width (taming: 64) and stride-2 layers (taming: 3, for
    disc_layers: PositiveInt = 2          # 256 px); 2 layers see 34 px patches, a whole 32 px image
    codebook_weight: float = Field(1.0, ge=0)  # on the quantiser loss; with the EMA codebook only its commitment
    pixel_l1_weight: float = Field(0.0, ge=0)  # reconstruction = l1 * |x - x'| + l2 * (x - x')^2 (no LPIPS here);
    pixel_l2_weight: float = Field(1.0, ge=0)  # (L2 rather than L1 by default: bench/RESULTS.md, "why the defaults")
    restart_every: NonNegativeInt = 200   # restart codes unused over this many steps; 0 = never
    grad_clip: PositiveFloat | None = None  # clip the VQGAN's and the PatchGAN's gradient norms; None: off (taming)
    checkpoint_every: PositiveInt = how_to_run(500)
    log_every: PositiveInt = how_to_run(50)
    workers: NonNegativeInt = how_to_run(0)  # 32 px PNGs decode faster than a loader worker hands them over
    bf16: bool = True  # bf16 autocast where native (GPU; AVX512-BF16/AMX CPU: RESULTS "bf16 on the CPU")


class TokenizerEval(Section):
    num_images: PositiveInt = 1000  # held-out images (val split when there is one) for PSNR/usage/FD
    batch_size: PositiveInt = 100


class Tokenizer(Section):
    checkpoint: Path | None = None  # official vqgan_jax_strongaug.ckpt; None = train our own
    model: TokenizerModel = TokenizerModel()
    train: TokenizerTrain = TokenizerTrain()
    eval: TokenizerEval = TokenizerEval()


class Tokenize(Section):
    batch_size: PositiveInt = 128
    chunk_size: PositiveInt = 1024
    workers: NonNegativeInt = how_to_run(2)
    bf16: bool = False  # bf16 where native; nearest-code ties then fall otherwise: some tokens differ from fp32


# -------------------------------------------------------------------------------------------- pixel
class PixelModel(Section):
    """MAGE (pipeline.models.mage); codebook size, token grid and rep size come from the stores. Default: a small
    CPU size for the default run's 8x8 tokens, width 64 (0.4M params; bench/RESULTS.md, "why the defaults"); MAGE-B is
    768/12/12 with a 768/8/16 decoder (presets)."""
    vocab: Literal["official", "compact"] = "compact"  # official: codebook + 1000 + 1 ids (needed by official files)
    embed_dim: PositiveInt = 64
    # encoder 2 blocks, decoder 4: the decoder sees every position and holds the grid convolutions, so that is
    # where a short run's blocks pay (bench/RESULTS.md, "a local prior for the pixel generator")
    depth: PositiveInt = 2
    num_heads: PositiveInt = 2
    decoder_embed_dim: PositiveInt = 64
    decoder_depth: PositiveInt = 4
    decoder_num_heads: PositiveInt = 2
    mlp_ratio: PositiveFloat = 4.0
    dropout: float = Field(0.0, ge=0, lt=1)           # attention probs, projections, MLP, embedding (official 0.1,
                                                      # the ImageNet presets' value; a short CPU run does not overfit)
    mask_ratio_mu: float = Field(0.75, gt=0, le=1)    # mask ratio ~ TruncNormal(mu, std) on [min, max], per batch;
    mask_ratio_std: PositiveFloat = 0.25              # ceil(L min) positions are dropped from the encoder
    mask_ratio_min: float = Field(0.5, gt=0, le=1)
    mask_ratio_max: float = Field(1.0, gt=0, le=1)
    rep_drop_prob: float = Field(0.1, ge=0, lt=1)     # slot -> fake_latent per sample (what guidance needs)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grid_conv: NonNegativeInt = 3                     # ours: a depthwise k x k conv over the token grid before each
                                                      # decoder block (odd k; 0: none, MAGE as published)

    @model_validator(mode="after")
    def _check(self) -> "PixelModel":
        if self.grid_conv % 2 == 0 and self.grid_conv:
            raise ValueError("pixel.model.grid_conv: the kernel must be odd (or 0 for none)")
        if not self.mask_ratio_min <= self.mask_ratio_mu <= self.mask_ratio_max:
            raise ValueError("pixel.model: mask_ratio_min <= mask_ratio_mu <= mask_ratio_max must hold")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("pixel.model: embed_dim / decoder_embed_dim must be divisible by their heads")
        return self


class PixelTrain(Section):
    """MAGE's recipe (docs/official.md §3.2): AdamW (0.9, 0.95), no decay on biases and 1-D params, warm-up +
    cosine to 0, clip 3.0. Default: ~68 epochs of the built-in set; ImageNet: batch 4096, blr 1.5e-4, 200-800
    epochs."""
    steps: PositiveInt = 4000
    batch_size: PositiveInt = 64       # global: split evenly across DDP ranks (and accumulation micro-batches)
    accum_steps: PositiveInt = 1       # gradient accumulation: each rank runs batch_size / world / accum at a time
    blr: PositiveFloat = 1.8e-2        # lr = blr * batch_size / 256 (MAGE rule; official blr 1.5e-4 at 4096)
    warmup_steps: NonNegativeInt = 100  # linear warm-up from 0 (official: 10 epochs)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: PositiveFloat | None = 3.0
    ema_decay: float | None = Field(None, gt=0, lt=1)  # None: no EMA (official)
    codebook_init: bool = True         # word embeddings from the tokenizer's code vectors (ours, why:
                                       # bench/RESULTS.md, "why the defaults";
                                       # official and the ImageNet presets: random)
    bf16: bool = True  # bf16 autocast where native (GPU; AVX512-BF16/AMX CPU: RESULTS "bf16 on the CPU")
    checkpoint_every: PositiveInt = how_to_run(200)
    log_every: PositiveInt = how_to_run(20)


class PixelEval(Section):
    """Validation loss and masked-token accuracy at one fixed mask ratio (seeded masks) on held-out images: the
    stores hold the train split only, so ``num_images`` of its images (a seeded choice) are never trained on."""
    num_images: NonNegativeInt = 256   # view 0 of each; 0 = no evaluation
    mask_ratio: float = Field(0.75, gt=0, le=1)
    batch_size: PositiveInt = how_to_run(128)  # masks are drawn per image: the figures do not depend on it


class PixelCluster(Section):
    """k-means of the stored view-0 reps (seeded): the labels of the ``cluster`` conditioning."""
    k: PositiveInt = 10
    iters: PositiveInt = 50


PIXEL_GENERATORS = ("rep", "none", "class", "cluster")  # the conditionings (pipeline.models.mage.CONDITIONINGS)


class Pixel(Section):
    # Official files imported instead of training, one entry per generator so that each train_pixel@<cond> depends
    # on its own: ``rep`` takes RCG's rep-conditioned MAGE-B/L, ``none`` LTH14/mage's unconditional MAGE-B/L (the
    # baseline). class and cluster have no official file; their entries exist so that DVC finds every key.
    checkpoints: dict[Literal["rep", "none", "class", "cluster"], Path | None] = dict.fromkeys(PIXEL_GENERATORS)
    # The generators dvc repro trains (train_pixel@<cond>): RCG's and the unconditional baseline's by default;
    # class / cluster (the paper's Table 9a rows) also need their settings in dvc.yaml's ``generation``.
    conditionings: list[Literal["rep", "none", "class", "cluster"]] = ["rep", "none"]
    model: PixelModel = PixelModel()
    train: PixelTrain = PixelTrain()
    eval: PixelEval = PixelEval()
    cluster: PixelCluster = PixelCluster()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict) and "checkpoint" in value:
            raise ValueError("pixel.checkpoint: renamed to pixel.checkpoints.rep (pixel.checkpoints.none imports "
                             "the unconditional MAGE)")
        return value

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _every_generator(cls, value: Any) -> Any:
        """A partly given mapping (``--set pixel.checkpoints.none=FILE``) keeps null for the other generators."""
        return {**dict.fromkeys(PIXEL_GENERATORS), **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> "Pixel":
        if unofficial := [c for c in ("class", "cluster") if self.checkpoints[c] is not None]:
            raise ValueError(f"pixel.checkpoints.{unofficial[0]}: no official file exists for that generator; only "
                             "rep (RCG's MAGE) and none (LTH14/mage's unconditional MAGE) can be imported")
        if self.train.batch_size % self.train.accum_steps:
            raise ValueError(f"pixel.train.batch_size ({self.train.batch_size}) must be divisible by "
                             f"pixel.train.accum_steps ({self.train.accum_steps})")
        return self


# ------------------------------------------------------------------------------------ judge, score
class JudgeModel(Section):
    """The judge's CNN (pipeline.models.judge): ``stages`` blocks, each doubling the width and halving the size."""
    width: PositiveInt = 16
    stages: PositiveInt = Field(4, le=8)


class JudgeTrain(Section):
    """Supervised training on the train split's labels (pipeline.train.judge); epochs:
    bench/RESULTS.md, "why the defaults"."""
    epochs: PositiveInt = 8
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 3e-3           # AdamW, one-cycle: linear warm-up over the first epoch, cosine to 0
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    workers: NonNegativeInt = how_to_run(0)
    log_every: PositiveInt = how_to_run(20)
    checkpoint_every: PositiveInt = how_to_run(200)


class Judge(Section):
    """A classifier that judges samples in a feature space RCG is not conditioned on (needs labelled data)."""
    model: JudgeModel = JudgeModel()
    train: JudgeTrain = JudgeTrain()


class SslJudgeViTModel(Section):
    """The ssl_judge's ViT (``ssl_judge.model.arch: vit``, or ``auto`` beside a ResNet encoder): MoCo v3's ViT at
    the views' crop size, which ``patch_size`` must divide."""
    patch_size: PositiveInt = 8
    embed_dim: PositiveInt = 64
    depth: PositiveInt = 4
    num_heads: PositiveInt = 2

    @model_validator(mode="after")
    def _check(self) -> "SslJudgeViTModel":
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError("ssl_judge.model.vit.embed_dim must be divisible by num_heads and by 4 (sin-cos)")
        return self


class SslJudgeModel(Section):
    """The ssl_judge's network (pipeline.models.ssl_judge), other weights than the conditioning encoder's. ``arch``
    auto is the other family than ``encoder.model.arch``, so the space is another architecture too: a CNN (a
    stem, then ``stages`` residual blocks, each doubling the width and halving the size) beside a ViT encoder, the
    ViT under ``vit`` beside a ResNet."""
    arch: Literal["auto", "cnn", "vit"] = "auto"
    width: PositiveInt = 16
    stages: PositiveInt = Field(3, le=8)
    proj_hidden_dim: PositiveInt = 256
    proj_dim: PositiveInt = 64
    vit: SslJudgeViTModel = SslJudgeViTModel()


class SslJudgeTrain(Section):
    """MoCo v3 on the train split's centre crops (stages/train_ssl_judge.py), batched random-resized crops and
    colour jitter (bench/RESULTS.md, "why the defaults")."""
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 128     # global: split evenly across DDP ranks
    lr: PositiveFloat = 1e-2          # the CNN's: AdamW, linear warm-up over the first epoch, cosine to 0
    vit_lr: PositiveFloat = 1.5e-3    # the ViT's (model.arch vit, or auto beside a ResNet encoder)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: PositiveFloat = 0.2
    momentum: float = Field(0.96, ge=0, le=1)  # base of the cosine momentum schedule (-> 1 at the end)
    crop_min: float = Field(0.3, gt=0, le=1)
    hue: float = Field(0.5, ge=0, le=0.5)
    grayscale: float = Field(0.5, ge=0, le=1)
    workers: NonNegativeInt = how_to_run(0)
    log_every: PositiveInt = how_to_run(20)
    checkpoint_every: PositiveInt = how_to_run(200)


class SslJudge(Section):
    """A second self-supervised encoder, trained without labels on the train split as its own network at another
    seed than the conditioning encoder, of the other family by default (``model.arch``): the ``ssl_judge``
    space, which RCG is not conditioned on."""
    seed: int = 1                     # the conditioning encoder trains at the top-level seed
    knn_k: PositiveInt = 20           # its k-NN accuracy (val split on train features) where labels exist
    model: SslJudgeModel = SslJudgeModel()
    train: SslJudgeTrain = SslJudgeTrain()


LABEL_SPACES = ("judge",)  # scored spaces whose model learns from labels
SSL_SPACES = ("ssl_judge",)  # scored spaces whose model learns from the images alone


class Score(Section):
    """Scoring samples through torch-fidelity's registered feature extractors (stages reference, score, compare).

    Images are compared at views.crop: reference images are centre crops of the train split at that size. Each
    listed space is its own reference@<space> instance; train_judge runs once per entry of ``label_spaces`` and
    train_ssl_judge once per entry of ``ssl_spaces`` (DVC cannot make a stage conditional), so a run that does not
    score in a space (unlabelled data, ImageNet with Inception) never trains its model."""
    spaces: list[Literal["judge", "encoder", "ssl_judge"]] = ["judge", "encoder", "ssl_judge"]
    label_spaces: list[Literal["judge"]] = ["judge"]  # the label spaces of ``spaces``: [judge], or [] without labels
    ssl_spaces: list[Literal["ssl_judge"]] = ["ssl_judge"]  # the self-supervised judges of ``spaces``: [ssl_judge] or []
    inception_weights: Path | None = None  # torch-fidelity's converted Inception file: adds Inception FID/IS/KID/PRC
    dinov2_weights: Path | None = None  # a DINOv2 state dict in timm's layout: adds FD_DINOv2 (and KID/PRC)
    dinov2_arch: str = "vit_large_patch14_dinov2"  # timm's architecture of dinov2_weights (ViT-L/14, Stein et al.)
    reference_npz: dict[Literal["judge", "encoder", "ssl_judge", "inception", "dinov2"], Path] = {}  # ADM-style
    num_reference_images: NonNegativeInt = 10000  # evenly spaced train images for the statistics; 0 = all
    batch_size: PositiveInt = how_to_run(100)  # features do not depend on it
    workers: NonNegativeInt = how_to_run(0)
    isc_splits: PositiveInt = 10
    kid_subsets: PositiveInt = 20  # torch-fidelity's default is 100 (bench/RESULTS.md, "why the defaults")
    kid_subset_size: PositiveInt = 1000  # capped at the sample / reference count (with a warning)
    prc_k: PositiveInt = 3
    min_samples: PositiveInt = 1000  # fewer samples: every figure of the setting carries a 'few_samples' warning

    @model_validator(mode="after")
    def _check(self) -> "Score":
        if not self.spaces and self.inception_weights is None and self.dinov2_weights is None:
            raise ValueError("score.spaces: empty and no score.inception_weights or score.dinov2_weights: nothing "
                             "to score in")
        for key, spaces in (("spaces", self.spaces), ("label_spaces", self.label_spaces),
                            ("ssl_spaces", self.ssl_spaces)):
            if len(set(spaces)) != len(spaces):
                raise ValueError(f"score.{key}: a space is listed twice ({spaces}): one DVC instance each")
        for key, kinds, stage in (("label_spaces", LABEL_SPACES, "train_judge"),
                                  ("ssl_spaces", SSL_SPACES, "train_ssl_judge")):
            listed, given = [s for s in self.spaces if s in kinds], getattr(self, key)
            if sorted(given) != sorted(listed):
                kind = "label" if key == "label_spaces" else "self-supervised"
                raise ValueError(f"score.{key}: must list the {kind} spaces of score.spaces ({listed}), which "
                                 f"{stage} trains, not {given}")
        for space in self.reference_npz:
            if space not in ("inception", "dinov2") and space not in self.spaces:
                raise ValueError(f"score.reference_npz.{space}: {space} is not in score.spaces")
        for space in ("inception", "dinov2"):
            if space in self.reference_npz and getattr(self, f"{space}_weights") is None:
                raise ValueError(f"score.reference_npz.{space}: needs score.{space}_weights to score samples")
        return self


# ------------------------------------------------------------------------------------------- sample
class SampleSetting(Section):
    """One generation setting of the sample stage (data/samples/<name>.zarr): which pixel generator
    (data/models/pixel-<generator>.pt), what it is conditioned on, and how the tokens are decoded."""
    generator: Literal["rep", "none", "class", "cluster"]
    reps: Literal["rdm", "stored"] | None = None  # rep generator only: RDM samples, or stored reps of real images (oracle)
    classes: list[NonNegativeInt] | None = None  # class-cond RDM / class generator: ids cycled in order; None = all
    guidance: float = Field(0.0, ge=0)        # classifier-free guidance scale s (grows as s (k+1)/T over the steps)
    iterations: PositiveInt = 20              # masked-decoding steps T (<= the token count, checked at sampling)
    temperature: float = Field(6.0, ge=0)     # token-choice (Gumbel) temperature tau, annealed as tau (1 - r)

    @model_validator(mode="after")
    def _check(self) -> "SampleSetting":
        if (self.generator == "rep") != (self.reps is not None):
            raise ValueError("reps ('rdm' or 'stored') is set for the 'rep' generator and only for it")
        if self.classes is not None and not (self.generator == "class" or self.reps == "rdm"):
            raise ValueError("classes needs the 'class' generator or RDM reps (a class-conditional RDM)")
        if self.classes == []:
            raise ValueError("classes: give at least one class id, or null for all")
        return self


REAL_ROW = "real"  # score@real: the held-out split scored like a generator (not a sample setting)
DEFAULT_ITERATIONS = 10  # the default run's 64 tokens (RCG: 20 for 256; the ImageNet presets say so)


def _default_settings() -> dict[str, SampleSetting]:
    return {"rcg": SampleSetting(generator="rep", reps="rdm", iterations=DEFAULT_ITERATIONS),
            "rcg_cfg": SampleSetting(generator="rep", reps="rdm", guidance=1.0, iterations=DEFAULT_ITERATIONS),
            "baseline": SampleSetting(generator="none", iterations=DEFAULT_ITERATIONS),
            "oracle": SampleSetting(generator="rep", reps="stored", guidance=1.0, iterations=DEFAULT_ITERATIONS),
            "class": SampleSetting(generator="class", iterations=DEFAULT_ITERATIONS),
            "cluster": SampleSetting(generator="cluster", iterations=DEFAULT_ITERATIONS)}


class SampleFigures(Section):
    """PNG figures of every setting (metrics/figures/<setting>/), cells upscaled (nearest) to ``cell`` px."""
    grid: PositiveInt = 64        # samples in the grid
    columns: PositiveInt = 8
    real_images: NonNegativeInt = 4  # Figure 6: real images whose rep is decoded into ``columns`` images each
    pairs: NonNegativeInt = 2        # Figure 7: pairs of real images interpolated in ``columns`` steps
    class_rows: PositiveInt = 10     # class-conditional settings: one row per class, at most this many
    cell: PositiveInt = 64


class Sample(Section):
    settings: dict[str, SampleSetting] = Field(default_factory=_default_settings)
    num_samples: PositiveInt = 1000
    batch_size: PositiveInt = 100  # also the store chunk: the unit of seeding, resume and rank splits
    seed: int = 0                  # chunk c draws from seed (seed, c): every setting sees the same streams
    rdm: RdmSample = RdmSample()   # the RDM's DDIM sampler for generation (RCG: 250 steps, eta 1)
    bf16: bool = False             # bf16 decoding + VQGAN where native; the RDM stays fp32
    figures: SampleFigures = SampleFigures()

    @field_validator("settings", mode="before")
    @classmethod
    def _complete_defaults(cls, value: Any) -> Any:
        """A partly given default setting (``--set sample.settings.rcg.guidance=2``) keeps its other defaults."""
        if not isinstance(value, dict):
            return value
        defaults = _default_settings()
        return {name: ({**defaults[name].model_dump(), **entry} if name in defaults and isinstance(entry, dict)
                       else entry) for name, entry in value.items()}

    @model_validator(mode="after")
    def _check(self) -> "Sample":
        bad = [name for name in self.settings if not name.replace("_", "").isalnum() or name != name.lower()]
        if bad:
            raise ValueError(f"sample.settings: names must be lower-case letters, digits and '_': {bad}")
        if REAL_ROW in self.settings:
            raise ValueError(f"sample.settings.{REAL_ROW}: the name of compare's held-out row (score real); "
                             "choose another")
        return self


# ------------------------------------------------------------------------------------------- params
class Runtime(Section):
    """How to run, not what to compute (marked so in Params): not a DVC dependency and not part of any resume
    identity, so changing it never invalidates outputs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegativeInt = 0  # torch intra-op threads; 0 = torch's default
    compile: bool = False        # torch.compile the model wherever the training loop runs it
    # `rcg <stage>` reruns a stage that shares its work across ranks under this command when it is not already
    # under torchrun, so that `dvc repro` trains on every GPU: e.g. "torchrun --nproc-per-node 8", or on each of
    # several nodes "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
    launcher: str | None = None
    # how long a rank waits at a barrier while rank 0 works alone (k-NN probe, RDM eval, figures, accuracy
    # passes); the barriers run on a CPU (gloo) group, so NCCL's own watchdog never sees these waits
    barrier_timeout_minutes: PositiveInt = 180


class Params(Section):
    seed: int = 0
    paths: Paths = Paths()
    data: Data = Data()
    shard: Shard = Shard()
    views: Views = Views()
    encoder: Encoder = Encoder()
    encode: Encode = Encode()
    rdm: Rdm = Rdm()
    tokenizer: Tokenizer = Tokenizer()
    tokenize: Tokenize = Tokenize()
    pixel: Pixel = Pixel()
    sample: Sample = Sample()
    judge: Judge = Judge()
    ssl_judge: SslJudge = SslJudge()
    score: Score = Score()
    runtime: Runtime = how_to_run(Runtime())

    @model_validator(mode="after")
    def _check_views_fit_shards(self) -> "Params":
        """Views resized above the shard's short side upsample images the shard stage already shrank: every rep,
        token and reference image comes out blurrier than the recipe's one resize of the original."""
        short = self.shard.resize_short_side
        if short is not None and self.views.resize > short:
            raise ValueError(f"views.resize ({self.views.resize}) is above shard.resize_short_side ({short}): the "
                             f"views would upsample shrunk images; shard at >= {self.views.resize} or keep the "
                             "originals (shard.resize_short_side: null)")
        return self

    @model_validator(mode="after")
    def _check_labels_exist(self) -> "Params":
        """A label-based row or space on data declared unlabelled stops here, before any stage runs."""
        if self.data.labels != "none":
            return self
        if self.score.label_spaces:
            raise ValueError(f"score.label_spaces: {self.score.label_spaces[0]} trains on labels, but data.labels is "
                             "none: set score.label_spaces: [] and drop it from score.spaces")
        if "class" in self.pixel.conditionings:
            raise ValueError("pixel.conditionings: class needs labels, but data.labels is none (cluster needs none)")
        return self

    @model_validator(mode="after")
    def _check_ssl_judge_patches(self) -> "Params":
        """A ViT ssl_judge cuts the views' crops into patches: a crop it does not divide would fail at its stage."""
        patch = self.ssl_judge.model.vit.patch_size
        if self.ssl_judge_arch() == "vit" and self.views.crop % patch:
            raise ValueError(f"ssl_judge.model.vit.patch_size ({patch}) must divide views.crop ({self.views.crop}): "
                             f"the ssl_judge is a ViT (ssl_judge.model.arch {self.ssl_judge.model.arch}, "
                             f"encoder.model.arch {self.encoder.model.arch})")
        return self

    def ssl_judge_arch(self) -> str:
        """``ssl_judge.model.arch`` resolved: ``auto`` is the family the conditioning encoder is not (a ViT beside
        a ResNet, a CNN beside a ViT)."""
        arch = self.ssl_judge.model.arch
        if arch == "auto":
            return "vit" if self.encoder.model.arch == "resnet" else "cnn"
        return arch

    def section(self, name: str) -> dict:
        """A section as plain JSON-able data: what a stage records beside its outputs."""
        return self.model_dump(mode="json")[name]


def _leaves(cls: type[Section], prefix: str) -> list[str]:
    keys = []
    for name, info in cls.model_fields.items():
        if _is_how_to_run(info):
            continue
        key = f"{prefix}.{name}" if prefix else name
        kind = info.annotation
        keys += _leaves(kind, key) if isinstance(kind, type) and issubclass(kind, Section) else [key]
    return keys


def what_to_compute(section: str = "") -> list[str]:
    """The dotted leaf keys under ``section`` ("" = all; "rdm", "rdm.train", "views.crop", ...) that decide what is
    computed: every key of the schema except the fields marked :func:`how_to_run` (and everything under a marked
    section). Resume identities are built from them; dvc.yaml ``params:`` can list them."""
    cls: type[Section] = Params
    for i, part in enumerate(section.split(".") if section else []):
        info = cls.model_fields.get(part)
        if info is None:
            raise RcgError(f"what_to_compute: no key {'.'.join(section.split('.')[:i + 1])!r} in the params schema")
        if _is_how_to_run(info):
            return []
        kind = info.annotation
        if not (isinstance(kind, type) and issubclass(kind, Section)):
            return [section]
        cls = kind
    return _leaves(cls, section)


# ------------------------------------------------------------------------------------------ loading
def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # A validator that names its own key already says where (a check across sections, at the top level,
        # always does); otherwise prefix the location.
        lines.append(msg if not key or msg.startswith(key.split(".")[0] + ".") else f"{key}: {msg}")
    return "invalid params: " + "; ".join(lines)


def parse_value(text: str) -> Any:
    """``--set`` values use YAML scalars: 3, 0.5, true, null, [1, 2] all mean what they look like."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` to a nested dict; unknown keys are caught later by the schema."""
    if "=" not in assignment:
        raise RcgError(f"--set expects key=value, got {assignment!r}")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RcgError(f"--set: malformed key {key!r}")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RcgError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = parse_value(raw)


def deep_merge(base: dict, over: dict) -> dict:
    """A new tree: ``over`` on top of ``base``; neither input is modified or aliased."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RcgError(f"params file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RcgError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(tree, dict):
        raise RcgError(f"{path}: expected a mapping of sections at the top level")
    return tree


def validate(tree: dict) -> Params:
    """The schema's checks only: files and folders are checked by the stage that reads them
    (:func:`pipeline.core.errors.require_file`), so a stage runs while files it never reads are still missing."""
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise RcgError(_format_error(err)) from None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Params:
    """Params from a YAML file (missing keys take the defaults) plus ``key=value`` overrides."""
    tree = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


def preset(name: str, overrides: list[str] = ()) -> Params:
    """A full Params from a named overlay in pipeline/presets/, plus ``key=value`` overrides."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise RcgError(f"unknown preset {name!r} (known: {known})")
    tree = read_yaml(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


def dump_yaml(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
