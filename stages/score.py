"""Stage ``score`` (one instance per sample setting): ``data/samples/<setting>.zarr`` -> ``metrics/score/<setting>.json``.

Per scored space (pipeline.eval.fidelity): the judge's FID and IS (the headline: it shares nothing with what RCG is
conditioned on), the encoder's FD (which favours representation-conditioned generators), Inception's FID and IS
when its weights are given; KID and precision/recall in each. The Fréchet distance is against the reference's
statistics (or the user's ``score.reference_npz``), KID and precision/recall against its features. Every space
records its sample count, its reference and its warnings.
"""

from __future__ import annotations

import json
import time

from pipeline.core.artifacts import file_sha256, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError, require_file
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.data.sample_store import open_samples
from pipeline.eval.fidelity import (create_extractor, extract, extractor_weights, load_reference, min_samples_needed,
                                    reference_dir, sample_batches, sample_resolution, score_features, scored_spaces,
                                    warning_lines)

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "score"]


def reference_meta(params: Params, spaces: list[str], resolution: int) -> dict:
    """The reference's record, checked against the samples' resolution and the current extractors."""
    path = reference_dir(params) / "meta.json"
    if not path.is_file():
        raise RcgError(f"no reference statistics at {path.parent}: run `rcg reference` first")
    meta = json.loads(path.read_text())
    if meta["resolution"] != resolution:
        raise RcgError(f"the samples are {resolution}x{resolution} but the reference in {path.parent} is "
                       f"{meta['resolution']}x{meta['resolution']} (views.crop): generate and score at one size")
    for s in spaces:
        if s not in meta["spaces"]:
            raise RcgError(f"{path.parent} has no {s} statistics: rerun `rcg reference`")
        if meta["spaces"][s]["weights_sha256"] != file_sha256(extractor_weights(params, s)):
            raise RcgError(f"{path.parent}/{s}.npz was computed with another {extractor_weights(params, s)}: "
                           "rerun `rcg reference`")
    return meta


def run(params: Params, item: str) -> dict:
    if item not in params.sample.settings:
        raise RcgError(f"score: unknown setting {item!r} (sample.settings: {', '.join(params.sample.settings)})")
    cfg = params.score
    require_file(cfg.inception_weights, "score.inception_weights")
    for space, npz in cfg.reference_npz.items():
        require_file(npz, f"score.reference_npz.{space}")
    device = device_for(params.runtime)
    spaces = scored_spaces(cfg)
    path = params.paths.data / "samples" / f"{item}.zarr"
    if not path.exists():
        raise RcgError(f"no sample store at {path}: run `rcg sample {item}` first")
    samples = open_samples(path)
    count, resolution = len(samples), sample_resolution(samples.images, path)
    need = max(min_samples_needed(s, cfg.isc_splits, cfg.prc_k) for s in spaces)
    if count < need:
        raise RcgError(f"{samples.path} holds {count} samples; the metrics need at least {need} "
                       "(score.isc_splits, score.prc_k + 1)")
    meta = reference_meta(params, spaces, resolution)
    extractors = {s: create_extractor(s, extractor_weights(params, s), device) for s in spaces}
    started = time.perf_counter()
    features = extract(extractors, sample_batches(samples.images, cfg.batch_size), device)
    ours_name = f"train:{meta['num_images']}"
    scores = {}
    for s in spaces:
        dim = meta["spaces"][s]["dim"]
        ours = load_reference(reference_dir(params) / f"{s}.npz", dim, s, ours_name)
        fd_ref = load_reference(cfg.reference_npz[s], dim, s) if s in cfg.reference_npz else ours
        scores[s] = score_features(s, features[s], fd_ref, ours, cfg.isc_splits, cfg.kid_subsets,
                                   cfg.kid_subset_size, cfg.prc_k, cfg.min_samples, params.seed)
    seconds = time.perf_counter() - started
    metrics = {"setting": item, "num_samples": count, "resolution": resolution,
               "seconds": round(seconds, 2), **scores}
    if "seconds" in samples.attrs:  # what the sample stage took (absent for stores written without the record)
        metrics["sample_seconds"] = samples.attrs["seconds"]
    out = params.paths.metrics / "score" / f"{item}.json"
    write_json(out, metrics)
    for line in warning_lines(item, scores):
        log(line)
    return {"output": str(out), "num_samples": count, "seconds": metrics["seconds"],
            **{f"{s}_{k}": scores[s][k] for s in spaces for k in ("fid", "fd", "isc") if k in scores[s]}}
