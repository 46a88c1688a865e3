"""Stage ``encode``: every view of every training image through the frozen encoder, once -> ``data/reps.zarr``.

Then a k-NN probe of what was stored next to the same probe of a randomly initialised encoder of the same
shape -> ``metrics/encoder.json`` (docs/metrics.md).
"""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.artifacts import load_model, write_json
from pipeline.core.config import Params
from pipeline.core.runtime import device_for
from pipeline.data.stores import StoreWriter, open_store
from pipeline.models.view_encoder import build_rep_store
from pipeline.data.views import ViewRecipe
from pipeline.eval.encoder_eval import encoder_knn_probe
import pipeline.models.encoder  # noqa: F401  (registers the "encoder" model kind)

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["seed", "views", "encode"]


def finish(params: Params, writer: StoreWriter, stats: dict) -> dict:
    """Main rank, after every rank is done: move the store into place, probe it, write the metrics."""
    writer.finalize()
    payload = load_model("encoder", params.paths.model_file("encoder"))[1]
    metrics = encoder_knn_probe(params.paths.reps, params.paths.shards, ViewRecipe(**params.views.model_dump()),
                                payload["config"], params.encode, params.seed, device_for(params.runtime))
    out = params.paths.metrics / "encoder.json"
    write_json(out, {**metrics, "encoder": payload["summary"].get("source")})
    shape = list(open_store(params.paths.reps, "reps")["reps"].shape)
    return {"output": str(params.paths.reps), "shape": shape, "metrics": str(out), **stats,
            **{k: metrics[k] for k in ("knn_top1", "knn_top1_random_init") if k in metrics}}


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    writer, stats = build_rep_store(params, d, device_for(params.runtime, d.local_rank))
    d.barrier()
    summary = finish(params, writer, stats) if d.is_main else stats
    d.barrier()
    return summary
