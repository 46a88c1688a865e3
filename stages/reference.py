"""Stage ``reference`` (one instance per scored space): the real images' statistics in that feature space, once ->
``data/reference/<space>.npz`` and ``<space>.json``.

``num_reference_images`` evenly spaced train images, centre-cropped at views.crop (the resolution samples are
generated at), go through the space's extractor: the ``.npz`` holds float64 ``mu``/``sigma`` (the Fréchet
distance) and the float32 features (KID, precision/recall); the ``.json`` records what they were computed from
(resolution, rows, the extractor's weight hash), which ``score`` checks before comparing. One instance per space
means one extractor per run: the judge's model file is read only by ``reference@judge``, so nothing needs labels
unless the judge space is listed. Inception's and DINOv2's weights are files DVC cannot depend on
conditionally: their instances are run by hand (``rcg reference inception``, ``rcg reference dinov2``), not by
``dvc repro``.
"""

from __future__ import annotations

import time

from torch.utils.data import DataLoader

from pipeline.core.artifacts import atomic_file, file_sha256, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError, require_file
from pipeline.core.progress import progress
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages, evenly_spaced
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.eval.fidelity import (EXTERNAL_SPACES, LAYERS, create_extractor, external_weights, extract,
                                    extractor_weights, reference_dir, save_reference, scored_spaces)

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["views.crop", "score.inception_weights", "score.dinov2_weights", "score.dinov2_arch",
          "score.num_reference_images"]


def run(params: Params, space: str) -> dict:
    cfg = params.score
    spaces = scored_spaces(cfg)
    if space not in spaces:
        raise RcgError(f"reference: {space!r} is not a scored space (score.spaces: {', '.join(cfg.spaces) or 'none'}"
                       "; inception needs score.inception_weights, dinov2 score.dinov2_weights)")
    if space in EXTERNAL_SPACES:
        require_file(external_weights(cfg, space), f"score.{space}_weights")
    device = device_for(params.runtime)
    weights = extractor_weights(params, space)
    extractor = create_extractor(space, weights, device, cfg.dinov2_arch)
    shards = ShardSet(params.paths.shards, "train")
    rows = evenly_spaced(len(shards), cfg.num_reference_images)
    resolution = params.views.crop
    loader = DataLoader(ShardImages(shards, resolution, rows), batch_size=cfg.batch_size, num_workers=cfg.workers)
    started = time.perf_counter()
    layer = LAYERS[space][0]
    features = extract({space: extractor}, progress(loader, desc=f"reference {space}", unit="batch"), device)[space][layer]
    seconds = time.perf_counter() - started
    meta = {"space": space, "resolution": resolution, "num_images": len(rows), "split": "train",
            "index_sha256": file_sha256(params.paths.shards / INDEX_FILE), "seconds": round(seconds, 2),
            "images_per_s": round(len(rows) / seconds, 1), "extractor": extractor.get_name(), "layer": layer,
            "dim": features.shape[1], "weights_sha256": file_sha256(weights)}
    out = reference_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{space}.npz") as tmp:
        save_reference(tmp, features)
    write_json(out / f"{space}.json", meta)
    return {"output": str(out / f"{space}.npz"), "space": space, "num_images": len(rows), "resolution": resolution,
            "seconds": meta["seconds"]}
