"""Sample quality through torch-fidelity: one code path for every feature space.

Five spaces, each a feature extractor in torch-fidelity's registry, created by its ``create_feature_extractor``
and scored by its metric functions (Inception Score, KID, precision/recall):

- ``inception``: torch-fidelity's own ``inception-v3-compat`` from a local weights file (nothing is downloaded);
- ``dinov2``: ``rcg-dinov2``, the CLS token of DINOv2 ViT-L/14 (Stein et al. 2023; EDM2's FD_DINOv2) in timm's
  architecture, from a local weights file in timm's layout (nothing is downloaded);
- ``judge``: ``rcg-judge``, the supervised classifier of pipeline.models.judge (penultimate features, logits);
- ``encoder``: ``rcg-encoder``, the representation RCG is conditioned on (favours rep-conditioned generators);
- ``ssl_judge``: ``rcg-ssl-judge``, a second self-supervised encoder (pipeline.models.ssl_judge): no labels needed,
  and not the space RCG is conditioned on.

Samples and reference images reach every extractor the same way: uint8 [B, 3, R, R] tensors at one resolution R
(reference images are centre crops of the train split at R, decoded from the shards, never re-saved), resized
inside the extractor. The Fréchet distance comes from (mu, sigma) in float64 (pipeline.eval.metrics, the formula
of torch-fidelity 0.4, which has no option for precomputed statistics), so a reference is an ADM-style ``.npz``:
``mu``, ``sigma`` and, for KID and precision/recall, optionally the reference ``features``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from pipeline.core.artifacts import load_checkpoint, load_model
from pipeline.core.config import Params, Score
from pipeline.core.errors import RcgError
from pipeline.data.images import decode_rgb
from pipeline.data.sample_store import open_samples
from pipeline.eval.metrics import frechet_distance, gaussian_stats
from pipeline.models.encoder import represent
from pipeline.models.judge import judge_input
import pipeline.models.ssl_judge  # noqa: F401  (registers the "ssl_judge" model kind)

SPACES = ("judge", "encoder", "ssl_judge", "inception", "dinov2")
EXTERNAL_SPACES = ("inception", "dinov2")  # scored when their weights file is given (score.<space>_weights)
EXTRACTOR_NAMES = {"judge": "rcg-judge", "encoder": "rcg-encoder", "ssl_judge": "rcg-ssl-judge",
                   "inception": "inception-v3-compat", "dinov2": "rcg-dinov2"}
# The layer each metric reads: FID/KID/PRC on the first, IS on the second (when the space has class scores).
LAYERS = {"judge": ("penultimate", "logits"), "encoder": ("rep",), "ssl_judge": ("features",),
          "inception": ("2048", "logits_unbiased"), "dinov2": ("cls",)}
FD_KEY = {"judge": "fid", "encoder": "fd", "ssl_judge": "fd", "inception": "fid", "dinov2": "fd"}
INCEPTION_FEATURES = 2048
DINOV2_ARCH = "vit_large_patch14_dinov2"  # timm's name (the .lvd142m weights' layout); score.dinov2_arch
DINOV2_SIZE = 224  # Stein et al. / dgm-eval: bicubic resize to 224, ImageNet mean/std
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- extractors
def _uint8_batch(x: torch.Tensor) -> None:
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")


class _ModelFileExtractor(FeatureExtractorBase):
    """What our extractors share: plain eager models (torch-fidelity's compile path is not used)."""

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


class _FeaturesOnlyExtractor(_ModelFileExtractor):
    """An extractor of one feature layer and no class scores (so no Inception Score): ``LAYER`` names the layer,
    ``NAME`` the registered name and ``SPACE`` the words of the refusal."""

    LAYER: str
    NAME: str
    SPACE: str

    @classmethod
    def get_provided_features_list(cls) -> tuple[str, ...]:
        return (cls.LAYER,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric: str) -> str:
        if metric == "isc":
            raise ValueError(f"{cls.NAME} has no class scores: no Inception Score in {cls.SPACE}")
        return cls.LAYER


class JudgeExtractor(_ModelFileExtractor):
    """torch-fidelity extractor ``rcg-judge``: penultimate features and class logits of a judge model file
    (``feature_extractor_weights_path``)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise RcgError("rcg-judge: feature_extractor_weights_path must name a judge model file")
        self.model, _ = load_model("judge", feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _uint8_batch(x)
        feats = self.model.features(judge_input(x, self.model.img_size))
        out = {"penultimate": feats, "logits": self.model.head(feats)}
        return tuple(out[name].float() for name in self.features_list)


class EncoderExtractor(_FeaturesOnlyExtractor):
    """torch-fidelity extractor ``rcg-encoder``: RCG's standardised representation (as ``encode`` stores it)
    of an encoder model file (``feature_extractor_weights_path``)."""

    LAYER, NAME, SPACE = "rep", "rcg-encoder", "the representation space"

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise RcgError("rcg-encoder: feature_extractor_weights_path must name an encoder model file")
        self.model, _ = load_model("encoder", feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _uint8_batch(x)
        return (represent(self.model, x.float().div(255)),)


class SslJudgeExtractor(_FeaturesOnlyExtractor):
    """torch-fidelity extractor ``rcg-ssl-judge``: the pooled features of an ssl_judge model file
    (``feature_extractor_weights_path``)."""

    LAYER, NAME, SPACE = "features", "rcg-ssl-judge", "its space"

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise RcgError("rcg-ssl-judge: feature_extractor_weights_path must name an ssl_judge model file")
        self.model, _ = load_model("ssl_judge", feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _uint8_batch(x)
        return (self.model.features(x.float().div(255)),)


def load_dinov2(path: Path, arch: str = DINOV2_ARCH) -> torch.nn.Module:
    """timm's ``arch`` (pretrained=False; no head; its native 518-px position embeddings, resampled to the input
    size at run time) with the state dict of ``path`` loaded strictly: a missing file, a file that is not a state
    dict, or one whose keys or shapes differ is one line naming the file."""
    import timm  # here: only the dinov2 space needs it

    path = Path(path)
    if not timm.is_model(arch):
        raise RcgError(f"score.dinov2_arch: {arch!r} is not a timm model name (e.g. {DINOV2_ARCH})")
    if not path.is_file():
        raise RcgError(f"dinov2 weights not found: {path}")
    sd = load_checkpoint(path)
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items())):
        raise RcgError(f"dinov2 weights {path}: not a state dict (a flat dict of tensors, as "
                       "torch.save(model.state_dict()) writes)")
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    shapes = [f"{k} {list(sd[k].shape)} vs {list(want[k].shape)}" for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 f"{len(shapes)} shapes differ (e.g. {shapes[0]})" if shapes else ""]
        hint = ("; it looks like facebookresearch/dinov2's own layout: convert it to timm's first (README)"
                if "mask_token" in sd else "")
        raise RcgError(f"dinov2 weights {path}: not a timm {arch} state dict: "
                       f"{'; '.join(p for p in parts if p)}{hint}")
    model.load_state_dict(sd, strict=True)
    return model


class DinoV2Extractor(_FeaturesOnlyExtractor):
    """torch-fidelity extractor ``rcg-dinov2``: the CLS token after the final norm (1024-d for ViT-L/14) of a
    DINOv2 ViT in timm's layout (``feature_extractor_weights_path``; ``dinov2_arch``: timm's name). The input is
    preprocessed as in Stein et al.'s dgm-eval: uint8 -> [0, 1] -> bicubic resize to 224 -> ImageNet mean/std
    (torch's antialiased bicubic on floats, where dgm-eval resizes the PIL image: close, not bit-identical)."""

    LAYER, NAME, SPACE = "cls", "rcg-dinov2", "the DINOv2 space"

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 dinov2_arch: str = DINOV2_ARCH, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise RcgError("rcg-dinov2: feature_extractor_weights_path must name a DINOv2 weights file")
        self.model = load_dinov2(Path(feature_extractor_weights_path), dinov2_arch)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _uint8_batch(x)
        x = x.float().div(255)
        if x.shape[-2:] != (DINOV2_SIZE, DINOV2_SIZE):
            x = torch.nn.functional.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic",
                                                align_corners=False, antialias=True).clamp(0, 1)
        tokens = self.model.forward_features((x - self.mean) / self.std)  # [B, 1 + N, D], final norm applied
        return (tokens[:, 0].float(),)


for _space, _cls in (("judge", JudgeExtractor), ("encoder", EncoderExtractor), ("ssl_judge", SslJudgeExtractor),
                     ("dinov2", DinoV2Extractor)):
    if EXTRACTOR_NAMES[_space] not in FEATURE_EXTRACTORS_REGISTRY:  # a module reload must not register twice
        register_feature_extractor(EXTRACTOR_NAMES[_space], _cls)


def check_inception_weights(path: Path) -> None:
    """torch-fidelity unpickles its weights file in full; vet it first with ``weights_only=True`` (only tensors
    and containers) and check it is the converted Inception v3 it expects."""
    sd = load_checkpoint(path)
    fc = sd.get("fc.weight") if isinstance(sd, dict) else None
    if fc is None or tuple(fc.shape) != (1008, INCEPTION_FEATURES):
        raise RcgError(f"score.inception_weights: {path} is not torch-fidelity's Inception v3 state dict "
                       "(weights-inception-2015-12-05-6726825d.pth: fc.weight [1008, 2048])")


def create_extractor(space: str, weights: Path, device: torch.device,
                     dinov2_arch: str = DINOV2_ARCH) -> FeatureExtractorBase:
    """The registered extractor of ``space`` loaded from ``weights``, in eval mode on ``device`` (``dinov2_arch``:
    timm's architecture of the dinov2 space)."""
    if not Path(weights).is_file():
        raise RcgError(f"no {space} weights at {weights}")
    if space == "inception":
        check_inception_weights(Path(weights))
    options = {"dinov2_arch": dinov2_arch} if space == "dinov2" else {}
    try:
        return create_feature_extractor(EXTRACTOR_NAMES[space], list(LAYERS[space]), cuda=device.type == "cuda",
                                        feature_extractor_weights_path=str(weights), verbose=False, **options)
    except (RuntimeError, ValueError) as exc:  # a strict state-dict load or a torch-fidelity check failed
        raise RcgError(f"cannot build the {space} extractor from {weights}: {str(exc).splitlines()[0]}") from exc


@torch.no_grad()
def feature_dims(extractors: dict[str, FeatureExtractorBase], resolution: int,
                 device: torch.device) -> dict[str, int]:
    """The size of each space's scored features (its first layer), from one blank image: known before the samples
    go through, so a reference of the wrong size is refused before that work."""
    blank = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8, device=device)
    return {s: fe.convert_features_tuple_to_dict(fe(blank))[LAYERS[s][0]].shape[1] for s, fe in extractors.items()}


@torch.no_grad()
def extract(extractors: dict[str, FeatureExtractorBase], batches: Iterable[torch.Tensor],
            device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Every batch (uint8 [B, 3, R, R]) through every extractor: space -> layer -> float32 [N, D] on the CPU."""
    parts: dict[str, dict[str, list[torch.Tensor]]] = {s: {} for s in extractors}
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        for space, fe in extractors.items():
            for layer, value in fe.convert_features_tuple_to_dict(fe(batch)).items():
                parts[space].setdefault(layer, []).append(value.float().cpu())
    if not any(parts.values()):
        raise RcgError("no images to extract features from")
    return {s: {layer: torch.cat(v) for layer, v in d.items()} for s, d in parts.items()}


# ---------------------------------------------------------------------------------------- samples
def sample_resolution(images, path: Path) -> int:
    """R of a sample store's uint8 [M, R, R, 3] ``images`` array (square, as every reference is)."""
    _, h, w, _ = images.shape
    if h != w:
        raise RcgError(f"{path}: the samples are {h}x{w}; scoring compares square images")
    return h


def sample_batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """A sample store's ``images`` array [M, R, R, 3] as uint8 [B, 3, R, R] blocks of consecutive rows (one Zarr
    read each)."""
    for start in range(0, images.shape[0], batch_size):
        block = np.asarray(images[start:start + batch_size])
        yield torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG under ``folder`` (any depth), in sorted path order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_resolution(files: list[Path], folder: Path) -> int:
    """R of a folder of R x R images, from their headers (nothing is decoded): every image must have that size."""
    if not files:
        raise RcgError(f"{folder}: no PNG or JPEG images")
    sizes = {}
    for file in files:
        try:
            with Image.open(file) as img:
                sizes.setdefault(img.size, file)
        except OSError as exc:
            raise RcgError(f"{file}: not a readable image: {str(exc).splitlines()[0]}") from exc
        if len(sizes) > 1:
            (a, first), (b, other) = sizes.items()
            raise RcgError(f"{folder}: images of two sizes ({first.name} is {a[0]}x{a[1]}, {other.name} "
                           f"{b[0]}x{b[1]}): scoring compares images of one size")
    w, h = next(iter(sizes))
    if w != h:
        raise RcgError(f"{folder}: the images are {w}x{h}; scoring compares square images")
    return w


def folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """Image files decoded to RGB as uint8 [B, 3, R, R] batches, in order."""
    for start in range(0, len(files), batch_size):
        block = np.stack([np.asarray(decode_rgb(f.read_bytes())) for f in files[start:start + batch_size]])
        yield torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()


@dataclass
class SampleSource:
    """Images to score: a sample store or a folder of image files, as uint8 [B, 3, R, R] batches."""
    path: Path
    count: int
    resolution: int
    batches: Callable[[int], Iterator[torch.Tensor]]  # batch size -> batches
    attrs: dict  # a sample store's record (settings, models, seconds); empty for a folder


def open_sample_source(path: Path) -> SampleSource:
    """A sample store (``rcg sample``'s ``.zarr``, from the graph or the offline mode; or the folder the offline
    mode wrote, holding one store beside its figures) or a folder of PNG/JPEG images of one square size (samples
    made by any other code)."""
    path = Path(path)
    if not path.is_dir():
        raise RcgError(f"--samples: {path} is not a sample store (.zarr) or a folder of PNG/JPEG images")
    stores = sorted(p.name for p in path.glob("*.zarr") if p.is_dir())
    if len(stores) > 1:
        raise RcgError(f"--samples: {path} holds {len(stores)} sample stores ({', '.join(stores)}): give one")
    if len(stores) == 1:  # `rcg sample --out DIR`: score the store, not the figures' PNGs
        path = path / stores[0]
    if path.suffix == ".zarr" or (path / "zarr.json").is_file():
        store = open_samples(path)
        return SampleSource(path, len(store), sample_resolution(store.images, path),
                            lambda batch_size: sample_batches(store.images, batch_size), store.attrs)
    files = image_files(path)
    return SampleSource(path, len(files), folder_resolution(files, path),
                        lambda batch_size: folder_batches(files, batch_size), {})


# -------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """Statistics of real images in one feature space: float64 mu [D], sigma [D, D], optional float32
    features [N, D] (KID, precision/recall), and a short name for the metrics."""
    name: str
    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None


def save_reference(path: Path, features: torch.Tensor) -> None:
    """ADM-style ``.npz`` of [N, D] reference features: ``mu``, ``sigma`` (float64) and the ``features``."""
    mu, sigma = gaussian_stats(features.numpy())
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, features=features.numpy().astype(np.float32))


def short_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:48]


def load_reference(path: Path, dim: int, space: str, name: str | None = None, features: bool = True) -> Reference:
    """A reference ``.npz`` (ours or ADM's ``mu``/``sigma``), checked against the space's feature size.

    Reads ``mu``, ``sigma`` and (when ``features``) the ``features`` array, nothing else: ADM's reference batch
    also holds its ~2 GB of images (``arr_0``) and the sFID statistics, which no figure here uses."""
    path = Path(path)
    if not path.is_file():
        raise RcgError(f"reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:  # lazy: an array is read when its key is
            names = set(npz.files)
            if "mu" not in names or "sigma" not in names:
                raise RcgError(f"{path}: a reference .npz needs 'mu' and 'sigma' (has {sorted(names)})")
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise RcgError(f"{path}: {list(mu.shape)} / {list(sigma.shape)} statistics, but the {space} space "
                               f"has {dim}-d features")
            stored = npz["features"] if features and "features" in names else None
    except RcgError:
        raise
    except Exception as exc:
        raise RcgError(f"{path}: not a readable .npz: {str(exc).splitlines()[0]}") from exc
    if stored is not None and (stored.ndim != 2 or stored.shape[1] != dim):
        raise RcgError(f"{path}: features {list(stored.shape)} do not match the {dim}-d {space} space")
    return Reference(name or f"npz:{short_name(path)}", mu, sigma,
                     None if stored is None else torch.from_numpy(stored.astype(np.float32)))


def scored_spaces(cfg: Score) -> list[str]:
    """score.spaces, plus Inception and DINOv2 when their weights are given."""
    return [s for s in SPACES if s in cfg.spaces or (s in EXTERNAL_SPACES and external_weights(cfg, s) is not None)]


def external_weights(cfg: Score, space: str) -> Path | None:
    """score.inception_weights / score.dinov2_weights."""
    return {"inception": cfg.inception_weights, "dinov2": cfg.dinov2_weights}[space]


def extractor_weights(params: Params, space: str) -> Path:
    """The file each space's extractor loads: the trained judge / encoder model files, or the user's Inception /
    DINOv2 weights."""
    if space in EXTERNAL_SPACES:
        return external_weights(params.score, space)
    return params.paths.model_file(space)


def reference_dir(params: Params) -> Path:
    return params.paths.data / "reference"


# ---------------------------------------------------------------------------------------- metrics
def min_samples_needed(space: str, isc_splits: int, prc_k: int) -> int:
    """Fewer samples than this and some figure of ``space`` is undefined (covariance, IS splits, k-NN radii)."""
    return max(2, prc_k + 1, isc_splits if len(LAYERS[space]) > 1 else 0)


WARNINGS = ("few_samples", "no_reference_features", "kid_subset_reduced")


def score_features(space: str, features: dict[str, torch.Tensor], fd_reference: Reference,
                   feature_reference: Reference | None, isc_splits: int, kid_subsets: int, kid_subset_size: int,
                   prc_k: int, min_samples: int, seed: int) -> dict:
    """Every figure of one space for sample ``features`` (layer -> [M, D]) against a reference: the Fréchet
    distance from ``fd_reference``'s statistics; KID and precision/recall against ``feature_reference``'s
    features (skipped when there are none); IS where the space has class logits. Numbers and short ids only."""
    feats = features[LAYERS[space][0]]
    m = len(feats)
    warnings = dict.fromkeys(WARNINGS, False)  # flags, not a list: a metrics file is one row of a table
    out: dict = {"num_samples": m, "reference": fd_reference.name, "warnings": warnings}
    if m < min_samples:
        warnings["few_samples"] = True
    mu, sigma = gaussian_stats(feats.numpy())
    out[FD_KEY[space]] = round(frechet_distance(mu, sigma, fd_reference.mu, fd_reference.sigma), 6)
    if len(LAYERS[space]) > 1:
        isc = isc_features_to_metric(features[LAYERS[space][1]], splits=isc_splits, shuffle=True, rng_seed=seed)
        out.update(isc=round(isc["inception_score_mean"], 6), isc_std=round(isc["inception_score_std"], 6))
    ref = feature_reference.features if feature_reference is not None else None
    if ref is None:
        warnings["no_reference_features"] = True
        return out
    if len(ref) <= prc_k:
        raise RcgError(f"{feature_reference.name}: {len(ref)} reference features; precision/recall need more than "
                       f"score.prc_k ({prc_k})")
    out["feature_reference"] = feature_reference.name
    subset = min(kid_subset_size, m, len(ref))
    if subset < kid_subset_size:
        warnings["kid_subset_reduced"] = True
    kid = kid_features_to_metric(feats, ref, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed,
                                 verbose=False)
    # Precision/recall on equal counts (Kynkäänniemi et al.): a seeded draw of M reference points when N > M.
    if len(ref) > m:
        ref = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))[:m]]
    prc = prc_features_to_metric(feats, ref, prc_neighborhood=prc_k, save_cpu_ram=True, verbose=False)
    out.update(kid=round(kid["kernel_inception_distance_mean"], 8), kid_std=round(kid["kernel_inception_distance_std"], 8),
               kid_subset_size=subset, precision=round(prc["precision"], 6), recall=round(prc["recall"], 6),
               prc_k=prc_k, prc_reference=len(ref))
    return out


def raised(space_scores: dict) -> list[str]:
    """The warnings one space's figures carry (their ids)."""
    return [name for name, on in space_scores.get("warnings", {}).items() if on]


def warning_lines(setting: str, scores: dict[str, dict]) -> list[str]:
    """One line per space whose figures carry warnings, for the stage to print."""
    return [f"warning: {setting}/{space}: {', '.join(raised(s))} ({s['num_samples']} samples)"
            for space, s in scores.items() if raised(s)]
