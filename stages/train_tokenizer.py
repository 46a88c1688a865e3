"""Stage ``train_tokenizer``: import the official VQGAN, or train one on the shards -> data/models/tokenizer.pt.

The parts: the random crops (pipeline.data.tokenizer_data), the VQGAN recipe on the shared loop
(pipeline.train.tokenizer: taming-transformers minus LPIPS, the codebook by EMA k-means with code restarts), the
official import (pipeline.models.official.vqgan). The quantiser stays the official plain nearest-L2 one, so the
file loads into the same class and tokenizes the same way.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model
from pipeline.core.config import Params
from pipeline.core.errors import RcgError, require_file
from pipeline.core.runtime import device_for
from pipeline.models.official.vqgan import infer_vqgan_config, load_official_vqgan
from pipeline.models.vqgan import ARCH, model_kwargs
from pipeline.train.identity import resume_identity, shards_identity
from pipeline.train.state import CurveLog
from pipeline.train.tokenizer import STAGE, train

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "views.crop", "tokenizer.checkpoint", "tokenizer.model", "tokenizer.train"]


def import_official(params: Params, out: Path) -> dict:
    """Check the official file against ``tokenizer.model`` field by field, then save it as an rcg model file
    (and the curve CSV dvc.yaml declares, a header alone: nothing is trained)."""
    path = params.tokenizer.checkpoint
    model = load_official_vqgan(path)
    inferred = infer_vqgan_config(model.state_dict())
    inferred["ch_mult"] = list(inferred["ch_mult"])
    wanted = model_kwargs(params.tokenizer.model)
    diffs = [f"{k}: file {inferred[k]} vs params {wanted[k]}" for k in ARCH if inferred[k] != wanted[k]]
    if diffs:
        raise RcgError(f"{path} does not match tokenizer.model ({'; '.join(diffs)}); "
                       f"set tokenizer.model to the file's architecture")
    summary = {"source": "official", "checkpoint": str(path), "sha256": file_sha256(path)}
    save_model("tokenizer", out, {"model": wanted}, model.state_dict(), summary=summary)
    CurveLog(params.paths.plots / f"{STAGE}.csv", [])  # what dvc.yaml declares; no training rows
    return {"output": str(out), **summary, "model": wanted}


def run(params: Params) -> dict:
    require_file(params.tokenizer.checkpoint, "tokenizer.checkpoint")
    out = params.paths.model_file("tokenizer")
    if params.tokenizer.checkpoint is not None:
        d = distributed.init(params.runtime)
        summary = import_official(params, out) if d.is_main else {"output": str(out)}
        d.barrier()
        return summary
    d = distributed.init(params.runtime)
    identity = resume_identity(params, PARAMS, shards=shards_identity(params.paths.shards))
    model, summary = train(params, identity, d, device_for(params.runtime, d.local_rank))
    if d.is_main:
        save_model("tokenizer", out, {"model": model_kwargs(params.tokenizer.model)}, model.state_dict(),
                   summary=summary)
    return {"output": str(out), **summary}
