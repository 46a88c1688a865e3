"""Stage ``tokenize``: every view of every training image through the frozen VQGAN, once -> ``data/tokens.zarr``
(:mod:`pipeline.models.view_tokenizer`), row for row and view for view aligned with ``encode``'s ``reps.zarr``."""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.config import Params
from pipeline.core.runtime import device_for
from pipeline.data.stores import open_store
from pipeline.models.view_tokenizer import build_token_store

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["views", "tokenize"]


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    writer, stats = build_token_store(params, d, device_for(params.runtime, d.local_rank))
    d.barrier()
    summary = stats
    if d.is_main:
        writer.finalize()
        shape = list(open_store(params.paths.tokens, "tokens")["tokens"].shape)
        summary = {"output": str(params.paths.tokens), "shape": shape, **stats}
    d.barrier()
    return summary
