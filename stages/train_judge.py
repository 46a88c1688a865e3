"""Stage ``train_judge``: a supervised classifier of the train split -> ``data/models/judge.pt``, ``metrics/judge.json``.

The judge sees the images exactly as scoring hands them to it (centre crops at views.crop, uint8, see
pipeline.data.eval_images), with random flips and small shifts in training. Its val-split accuracy says how much its
features are worth as a yardstick. The parts: the images and their augmentation (pipeline.data.judge_data), the
recipe on the shared loop (pipeline.train.judge: streamed, step-indexed, resumable), the accuracy
(pipeline.eval.judge_eval).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.data.shards import INDEX_FILE, META_FILE, ShardSet
from pipeline.eval.judge_eval import accuracy
from pipeline.models.judge import Judge
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.judge import train

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "views.crop", "judge"]


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    shards = ShardSet(params.paths.shards, "train")
    labels = np.asarray(shards.labels)
    if labels.min() < 0:
        raise RcgError("train_judge: the training images have no labels (a flat folder, or data.labels: none); drop "
                       "judge from score.spaces and score.label_spaces and score in encoder and ssl_judge")
    resolution = params.views.crop
    cfg = params.judge
    if resolution < 2 ** cfg.model.stages:
        raise RcgError(f"judge.model.stages ({cfg.model.stages}) halves views.crop ({resolution} px) below one pixel")
    config = {"model": {"img_size": resolution, "num_classes": int(labels.max()) + 1, **cfg.model.model_dump()}}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(params.seed)
        model = Judge(**config["model"])
    identity = resume_identity(params, PARAMS, shards=shards_identity(params.paths.shards))
    summary = train(model, shards, resolution, params, identity, d, device)
    if not d.is_main:
        d.barrier()
        return summary
    metrics = {"train_accuracy": round(accuracy(model, shards, resolution, cfg.train.workers, device), 4),
               "num_train": len(shards), "num_val": 0, "num_classes": config["model"]["num_classes"],
               "resolution": resolution, "feature_dim": model.feature_dim, **summary}
    splits = json.loads((params.paths.shards / META_FILE).read_text()).get("splits", {})
    if "val" in splits:
        val = ShardSet(params.paths.shards, "val")
        metrics.update(val_accuracy=round(accuracy(model, val, resolution, cfg.train.workers, device), 4),
                       num_val=len(val))
    else:
        log("train_judge: no val split; metrics/judge.json reports the train accuracy only")
    out = params.paths.model_file("judge")
    save_model("judge", out, config, model.state_dict(),
               summary={**metrics, "trained_on": {"index_sha256": file_sha256(params.paths.shards / INDEX_FILE)}})
    write_json(params.paths.metrics / "judge.json", metrics)
    d.barrier()
    return {"output": str(out), "metrics": str(params.paths.metrics / "judge.json"),
            **{k: metrics[k] for k in ("train_accuracy", "val_accuracy", "seconds") if k in metrics}}
