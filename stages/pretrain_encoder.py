"""Stage ``pretrain_encoder``: ``data/models/encoder.pt``, the frozen encoder every later stage reads.

With ``encoder.checkpoint`` set, the official MoCo v3 file is imported and must be the architecture
``encoder.model`` names; the curve ``metrics/plots/pretrain_encoder.csv`` is then a header alone (nothing
trained). Without one, MoCo v3 trains an encoder on the shards. Either way the file holds what RCG
keeps of MoCo v3, the base encoder with its projector, in the "rcg-encoder" format. The parts: the two crops
(pipeline.data.encoder_data), the MoCo v3 recipe on the shared loop (pipeline.train.encoder), the official import
(pipeline.models.official.encoder).
"""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import require_file
from pipeline.core.runtime import device_for
from pipeline.data.shards import ShardSet
from pipeline.models.official.encoder import load_encoder_as
from pipeline.train.encoder import STAGE
from pipeline.train.encoder import pretrain as train_encoder
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.state import CurveLog

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "encoder"]


def import_official(params: Params) -> dict:
    path, config = params.encoder.checkpoint, params.encoder.model.model_dump()
    model = load_encoder_as(path, config)
    summary = {"source": "official", "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    out = params.paths.model_file("encoder")
    save_model("encoder", out, {"model": config}, model.state_dict(), summary=summary)
    CurveLog(params.paths.plots / f"{STAGE}.csv", [])  # what dvc.yaml declares; no training rows
    return {"output": str(out), **summary}


def pretrain(params: Params, d: Dist) -> dict:
    device = device_for(params.runtime, d.local_rank)
    shards = ShardSet(params.paths.shards, "train")
    identity = resume_identity(params, PARAMS, shards=shards_identity(params.paths.shards))
    model, summary = train_encoder(params, shards, identity, d, device)
    out = params.paths.model_file("encoder")
    if d.is_main:
        save_model("encoder", out, {"model": params.encoder.model.model_dump()}, model.base_encoder.state_dict(),
                   summary=summary)
    d.barrier()
    return {"output": str(out), **summary}


def run(params: Params) -> dict:
    require_file(params.encoder.checkpoint, "encoder.checkpoint")
    d = distributed.init(params.runtime)
    if params.encoder.checkpoint is None:
        return pretrain(params, d)
    summary = import_official(params) if d.is_main else {}
    d.barrier()
    return summary
