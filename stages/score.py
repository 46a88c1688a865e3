"""Stage ``score`` (one instance per sample setting): ``data/samples/<setting>.zarr`` -> ``metrics/score/<setting>.json``.

Per scored space (pipeline.eval.fidelity): the judge's FID and IS (the headline where labels exist: it shares
nothing with what RCG is conditioned on), the ssl_judge's FD (self-supervised, another network: no labels needed),
the encoder's FD (which favours representation-conditioned generators), Inception's FID and IS when its weights
are given, FD_DINOv2 (Stein et al. 2023) when DINOv2's are; KID and precision/recall in each. ``rcg score real``
scores the held-out split the same way: compare's floor. The Fréchet distance is against the reference's
statistics (or the user's ``score.reference_npz``), KID and precision/recall against its features. Every space
records its sample count, its reference and its warnings. A space with ``score.reference_npz`` needs nothing
from ``rcg reference``: ADM's reference batch alone gives Inception FID and IS (KID and precision/recall need
reference features, which ADM's file does not hold, so they come from ``rcg reference`` when it has run).

:func:`run_files` is the offline ``rcg score --samples PATH``: any sample store or folder of images, against
reference ``.npz`` files given by path, outside the DVC graph (RCG's 50k-sample FID/IS of an official
checkpoint, without retraining anything).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from torch.utils.data import DataLoader

from pipeline.core.artifacts import file_sha256, write_json
from pipeline.core.config import REAL_ROW, Params, Score
from pipeline.core.errors import RcgError, require_file
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages, evenly_spaced
from pipeline.data.shards import META_FILE, ShardSet
from pipeline.eval.fidelity import (SPACES, Reference, SampleSource, create_extractor, extract, extractor_weights,
                                    feature_dims, load_reference, min_samples_needed, open_sample_source,
                                    reference_dir, score_features, scored_spaces, warning_lines)

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "score", "sample.num_samples"]

# Where the offline mode's extractor weights come from, for its messages.
WEIGHT_FLAGS = {"judge": "--judge", "encoder": "--encoder", "ssl_judge": "--ssl-judge",
                "inception": "--inception-weights", "dinov2": "--dinov2-weights"}
# What each external weights file is, for the offline mode's message when it is not given.
WEIGHT_FILES = {"inception": "torch-fidelity's weights-inception-2015-12-05-6726825d.pth",
                "dinov2": "a DINOv2 ViT-L/14 state dict in timm's layout (README)"}

# A space's two references: the Fréchet distance's statistics, and the features KID and precision/recall use.
References = dict[str, tuple[Reference, Reference | None]]


def check_enough(source: SampleSource, spaces: list[str], cfg: Score) -> None:
    need = max(min_samples_needed(s, cfg.isc_splits, cfg.prc_k) for s in spaces)
    if source.count < need:
        raise RcgError(f"{source.path} holds {source.count} samples; the metrics need at least {need} "
                       "(score.isc_splits, score.prc_k + 1)")


def reference_meta(params: Params, spaces: list[str], resolution: int) -> dict[str, dict]:
    """Each space's record from ``rcg reference <space>`` (``data/reference/<space>.json``), checked against the
    samples' resolution and the current extractor; a space with its own ``score.reference_npz`` may have none."""
    metas = {}
    for s in spaces:
        path = reference_dir(params) / f"{s}.json"
        if not path.is_file():
            if s not in params.score.reference_npz:
                raise RcgError(f"no {s} reference statistics at {path}: run `rcg reference {s}` first (or give "
                               f"score.reference_npz.{s})")
            continue
        meta = json.loads(path.read_text())
        if meta["resolution"] != resolution:
            raise RcgError(f"the samples are {resolution}x{resolution} but the {s} reference in {path.parent} is "
                           f"{meta['resolution']}x{meta['resolution']} (views.crop): generate and score at one size")
        if meta["weights_sha256"] != file_sha256(extractor_weights(params, s)):
            raise RcgError(f"{path.parent}/{s}.npz was computed with another {extractor_weights(params, s)}: "
                           f"rerun `rcg reference {s}`")
        metas[s] = meta
    return metas


def npz_references(paths: dict[str, Path], dims: dict[str, int], ours: References | None = None) -> References:
    """Each space's references: the given ``.npz`` for the Fréchet distance; for KID and precision/recall our
    reference's features when there are any (``ours``), else the ``.npz``'s own ``features`` if it holds them."""
    out = dict(ours or {})
    for s, path in paths.items():
        ours_features = out.get(s, (None, None))[1]
        given = load_reference(path, dims[s], s, features=ours_features is None)
        out[s] = (given, ours_features if ours_features is not None else
                  (given if given.features is not None else None))
    return out


def stage_references(params: Params, spaces: list[str], metas: dict[str, dict], dims: dict[str, int]) -> References:
    ours = {}
    for s, meta in metas.items():
        ref = load_reference(reference_dir(params) / f"{s}.npz", dims[s], s, f"train:{meta['num_images']}")
        ours[s] = (ref, ref)
    return npz_references({s: p for s, p in params.score.reference_npz.items() if s in spaces}, dims, ours)


def score_source(source: SampleSource, spaces: list[str], weights: dict[str, Path],
                 reference_of: Callable[[dict[str, int]], References], params: Params) -> tuple[dict, float]:
    """Every space's figures for ``source``: the extractors, their references (``reference_of(dims)``, loaded
    before the samples go through), the features, the metrics; -> (space -> figures, seconds)."""
    cfg, device = params.score, device_for(params.runtime)
    extractors = {s: create_extractor(s, weights[s], device, cfg.dinov2_arch) for s in spaces}
    references = reference_of(feature_dims(extractors, source.resolution, device))
    started = time.perf_counter()
    features = extract(extractors, source.batches(cfg.batch_size), device)
    scores = {s: score_features(s, features[s], *references[s], cfg.isc_splits, cfg.kid_subsets,
                                cfg.kid_subset_size, cfg.prc_k, cfg.min_samples, params.seed) for s in spaces}
    return scores, time.perf_counter() - started


def headline(scores: dict) -> dict:
    return {f"{s}_{k}": v[k] for s, v in scores.items() for k in ("fid", "fd", "isc") if k in v}


def held_out_source(params: Params) -> SampleSource:
    """compare's ``real`` row: the val split's images (evenly spaced, as many as a setting's samples when it holds
    more), centre-cropped at views.crop exactly like the reference images, scored as if a generator made them."""
    shards_dir = params.paths.shards
    meta_path = shards_dir / META_FILE
    if not meta_path.is_file() or "val" not in json.loads(meta_path.read_text()).get("splits", {}):
        raise RcgError(f"score {REAL_ROW}: {shards_dir} has no val split to score as the real row (give "
                       "data.val_folder, data.holdout > 0 or data.builtin.num_val > 0)")
    val = ShardSet(shards_dir, "val")
    rows = evenly_spaced(len(val), params.sample.num_samples)
    images = ShardImages(val, params.views.crop, rows)
    return SampleSource(shards_dir, len(rows), params.views.crop,
                        lambda batch_size: iter(DataLoader(images, batch_size=batch_size,
                                                           num_workers=params.score.workers)), {"split": "val"})


def run(params: Params, item: str) -> dict:
    if item not in params.sample.settings and item != REAL_ROW:
        raise RcgError(f"score: unknown setting {item!r} (sample.settings: {', '.join(params.sample.settings)}; "
                       f"{REAL_ROW}: the held-out images)")
    cfg = params.score
    require_file(cfg.inception_weights, "score.inception_weights")
    require_file(cfg.dinov2_weights, "score.dinov2_weights")
    for space, npz in cfg.reference_npz.items():
        require_file(npz, f"score.reference_npz.{space}")
    spaces = scored_spaces(cfg)
    path = params.paths.data / "samples" / f"{item}.zarr"
    if item != REAL_ROW and not path.exists():
        raise RcgError(f"no sample store at {path}: run `rcg sample {item}` first")
    source = held_out_source(params) if item == REAL_ROW else open_sample_source(path)
    check_enough(source, spaces, cfg)
    meta = reference_meta(params, spaces, source.resolution)
    weights = {s: extractor_weights(params, s) for s in spaces}
    scores, seconds = score_source(source, spaces, weights,
                                   lambda dims: stage_references(params, spaces, meta, dims), params)
    metrics = {"setting": item, "num_samples": source.count, "resolution": source.resolution,
               "seconds": round(seconds, 2), **scores}
    if "seconds" in source.attrs:  # what the sample stage took (absent for stores written without the record)
        metrics["sample_seconds"] = source.attrs["seconds"]
    out = params.paths.metrics / "score" / f"{item}.json"
    write_json(out, metrics)
    for line in warning_lines(item, scores):
        log(line)
    return {"output": str(out), "num_samples": source.count, "seconds": metrics["seconds"], **headline(scores)}


def run_files(params: Params, samples: Path, reference_npz: dict[str, Path], weights: dict[str, Path],
              out: Path | None = None) -> dict:
    """Offline ``rcg score --samples PATH --reference-npz [SPACE=]FILE [--inception-weights W] [--out JSON]``: a
    sample store or a folder of PNG/JPEG images, scored in each space given a reference ``.npz`` (the flags, else
    ``score.reference_npz``), by the extractor weights given (else ``score.inception_weights``,
    ``score.dinov2_weights`` and the project's judge/encoder model files); the metric settings (counts, KID
    subsets, k, seed) come from the params."""
    references = {**params.score.reference_npz, **reference_npz}
    if not references:
        raise RcgError("give --reference-npz FILE (e.g. ADM's VIRTUAL_imagenet256_labeled.npz: Inception FID and "
                       "IS) or --reference-npz SPACE=FILE (judge, encoder, ssl_judge, inception, dinov2)")
    spaces = [s for s in SPACES if s in references]
    files = {s: weights.get(s) or extractor_weights(params, s) for s in spaces}
    for s in spaces:
        require_file(references[s], f"--reference-npz {s}")
        if files[s] is None:
            raise RcgError(f"scoring in the {s} space needs {WEIGHT_FLAGS[s]} FILE "
                           f"({WEIGHT_FILES.get(s, 'a model file')})")
        require_file(files[s], WEIGHT_FLAGS[s])
    source = open_sample_source(samples)
    check_enough(source, spaces, params.score)
    log(f"score {source.path}: {source.count} images {source.resolution}x{source.resolution} in "
        f"{', '.join(spaces)} against {', '.join(str(references[s]) for s in spaces)}")
    scores, seconds = score_source(source, spaces, files,
                                   lambda dims: npz_references({s: references[s] for s in spaces}, dims), params)
    metrics = {"samples": str(source.path), "num_samples": source.count, "resolution": source.resolution,
               "seconds": round(seconds, 2), **scores}
    if out is not None:
        write_json(out, metrics)
    for line in warning_lines(source.path.name, scores):
        log(line)
    return {"output": None if out is None else str(out), **headline(scores), **metrics}
