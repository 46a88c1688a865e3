"""Stage ``reference``: the real images' statistics in every scored feature space, once -> ``data/reference/``.

``num_reference_images`` evenly spaced train images, centre-cropped at views.crop (the resolution samples are
generated at), go through every extractor in one pass: ``<space>.npz`` holds float64 ``mu``/``sigma`` (the
Fréchet distance) and the float32 features (KID, precision/recall); ``meta.json`` records what they were
computed from (resolution, rows, the extractors' weight hashes), which ``score`` checks before comparing.
"""

from __future__ import annotations

import time

from torch.utils.data import DataLoader

from pipeline.core.artifacts import atomic_dir, file_sha256, write_json
from pipeline.core.config import Params
from pipeline.core.errors import require_file
from pipeline.core.progress import progress
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages, evenly_spaced
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.eval.fidelity import (LAYERS, create_extractor, extract, extractor_weights, reference_dir, save_reference,
                                    scored_spaces)

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["views.crop", "score.spaces", "score.inception_weights", "score.num_reference_images"]


def run(params: Params) -> dict:
    require_file(params.score.inception_weights, "score.inception_weights")
    device = device_for(params.runtime)
    cfg = params.score
    spaces = scored_spaces(cfg)
    weights = {s: extractor_weights(params, s) for s in spaces}
    extractors = {s: create_extractor(s, weights[s], device) for s in spaces}
    shards = ShardSet(params.paths.shards, "train")
    rows = evenly_spaced(len(shards), cfg.num_reference_images)
    resolution = params.views.crop
    loader = DataLoader(ShardImages(shards, resolution, rows), batch_size=cfg.batch_size, num_workers=cfg.workers)
    started = time.perf_counter()
    features = extract(extractors, progress(loader, desc="reference", unit="batch"), device)
    seconds = time.perf_counter() - started
    meta = {"resolution": resolution, "num_images": len(rows), "split": "train",
            "index_sha256": file_sha256(params.paths.shards / INDEX_FILE), "seconds": round(seconds, 2),
            "images_per_s": round(len(rows) / seconds, 1),
            "spaces": {s: {"extractor": extractors[s].get_name(), "layer": LAYERS[s][0],
                           "dim": features[s][LAYERS[s][0]].shape[1], "weights_sha256": file_sha256(weights[s])}
                       for s in spaces}}
    out = reference_dir(params)
    with atomic_dir(out) as tmp:
        for s in spaces:
            save_reference(tmp / f"{s}.npz", features[s][LAYERS[s][0]])
        write_json(tmp / "meta.json", meta)
    return {"output": str(out), "spaces": spaces, "num_images": len(rows), "resolution": resolution,
            "seconds": meta["seconds"]}
