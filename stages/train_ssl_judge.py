"""Stage ``train_ssl_judge``: MoCo v3 on the train split -> ``data/models/ssl_judge.pt``, ``metrics/ssl_judge.json``.

The score space ``ssl_judge`` (pipeline.eval.fidelity): self-supervised, so it needs no labels, and trained as its
own network at another seed (``ssl_judge.seed``) than the conditioning encoder, of the other family by default (a
residual CNN beside a ViT encoder, a ViT beside a ResNet), so RCG was not conditioned on it.
Like the label judge it sees the images as scoring hands them over. The parts: the crops (pipeline.data.judge_data),
the recipe on the shared loop (pipeline.train.ssl_judge: streamed, step-indexed, resumable) and, where the shards
have labels, the k-NN accuracy of its features (pipeline.eval.judge_eval).
"""

from __future__ import annotations

import torch

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model, write_json
from pipeline.core.config import Params
from pipeline.core.runtime import device_for
from pipeline.data.shards import INDEX_FILE, ShardSet
from pipeline.eval.judge_eval import knn_metrics
from pipeline.models.ssl_judge import SslJudgeMoCo, build_ssl_judge, model_config
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.ssl_judge import train

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["views.crop", "ssl_judge", "encoder.model.arch"]  # the last picks arch auto's family


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    cfg, resolution = params.ssl_judge, params.views.crop
    shards = ShardSet(params.paths.shards, "train")
    config = {"model": model_config(params)}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        base = build_ssl_judge(config["model"])
        moco = SslJudgeMoCo(base, cfg.model.proj_hidden_dim, cfg.model.proj_dim, cfg.train.temperature)
    identity = resume_identity(params, PARAMS, shards=shards_identity(params.paths.shards))
    summary = train(moco, shards, resolution, params, identity, d, device)
    if not d.is_main:
        d.barrier()
        return summary
    metrics = {**knn_metrics(base, shards, params, device), "num_train": len(shards), "resolution": resolution,
               "arch": config["model"]["arch"], "feature_dim": base.feature_dim, "epochs": cfg.train.epochs, **summary}
    out = params.paths.model_file("ssl_judge")
    save_model("ssl_judge", out, config, base.state_dict(),
               summary={**metrics, "trained_on": {"index_sha256": file_sha256(params.paths.shards / INDEX_FILE)}})
    write_json(params.paths.metrics / "ssl_judge.json", metrics)
    d.barrier()
    return {"output": str(out), "metrics": str(params.paths.metrics / "ssl_judge.json"),
            **{key: metrics[key] for key in ("knn_top1", "seconds") if key in metrics}}
