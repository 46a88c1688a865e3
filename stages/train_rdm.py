"""Stage ``train_rdm``: the Representation Diffusion Model, trained on the cached ``reps.zarr`` and evaluated.

Reads the store into memory (``pipeline.data.rep_store``), trains the RDM on it or, with ``rdm.checkpoint``
set, imports an official one (``pipeline.models.official.rdm.load_official_rdm_model``; its curve CSV is then a header
alone), scores its samples (``pipeline.eval.rdm_eval``) and writes ``rdm.pt`` and ``metrics/rdm.json``. The reps
are mapped into the RDM's (optionally whitened) space on the way in, and samples back on the way out.
"""

from __future__ import annotations

import time

from pipeline.core import distributed
from pipeline.core.artifacts import save_model, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError, require_file
from pipeline.core.progress import log
from pipeline.core.runtime import device_for
from pipeline.data.rep_store import load_store, store_stats
from pipeline.eval.rdm_eval import evaluate
from pipeline.models.official.rdm import load_official_rdm_model
from pipeline.models.rdm import rdm_kwargs
from pipeline.train.rdm import STAGE, train_rdm
from pipeline.train.state import CurveLog

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "rdm"]


# ------------------------------------------------------------------------------------------------- run
def run(params: Params) -> dict:
    require_file(params.rdm.checkpoint, "rdm.checkpoint")
    d = distributed.init(params.runtime)
    device = device_for(params.runtime, d.local_rank)
    started = time.perf_counter()
    store = load_store(params.paths.reps, params.rdm.model, device)
    stats = store_stats(store.reps, device=device)
    if params.rdm.checkpoint is not None:
        if d.world > 1:
            raise RcgError("importing rdm.checkpoint needs no torchrun: run it on one process")
        model, ema, kwargs, summary = load_official_rdm_model(
            params.rdm.checkpoint, rdm_kwargs(params.rdm.model), params.rdm.model.whiten_power,
            params.rdm.diffusion.model_dump(), store.identity, str(store.path), device)
        CurveLog(params.paths.plots / f"{STAGE}.csv", [])  # what dvc.yaml declares; no training rows
    else:
        model, ema, kwargs, summary = train_rdm(params, store, stats, device, d)
    if not d.is_main:
        return {"rank": d.rank, **summary}

    tic = time.perf_counter()
    metrics = evaluate(params.rdm, params.seed, model, ema, store, stats, device)  # both outputs appear together
    summary["eval_seconds"] = round(time.perf_counter() - tic, 2)
    rdm = params.section("rdm")
    config = {"model": kwargs, "diffusion": rdm["diffusion"], "sample": rdm["sample"], "store": store.identity,
              "whitening": {k: rdm["model"][k] for k in ("whiten_power", "whiten_eps")},
              "min_snr_gamma": None if summary["source"] == "official" else rdm["train"]["min_snr_gamma"]}
    out_path, metrics_path = params.paths.model_file("rdm"), params.paths.metrics / "rdm.json"
    save_model("rdm", out_path, config, model.state_dict(), ema.state_dict() if ema is not None else None, summary)
    write_json(metrics_path, {**metrics, **{k: summary[k] for k in ("source", "encoder_check") if k in summary}})
    log(f"train_rdm: FD generated {metrics['fd_generated']:.4f} vs lower bound {metrics['fd_lower_bound']:.4f} "
        f"(ratio {metrics['ratio']:.3f}; Gaussian fit {metrics['fd_gaussian_fit']:.4f}), precision "
        f"{metrics['precision']:.3f} recall {metrics['recall']:.3f} (real reps: {metrics['precision_real']:.3f} / "
        f"{metrics['recall_real']:.3f})")
    return {"output": str(out_path), "metrics": str(metrics_path), **summary,
            **{k: metrics[k] for k in ("fd_generated", "fd_lower_bound", "ratio", "precision", "recall",
                                       "class_agreement") if k in metrics},
            "total_seconds": round(time.perf_counter() - started, 2)}
