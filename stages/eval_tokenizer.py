"""Stage ``eval_tokenizer``: how well the tokenizer keeps what RCG needs -> ``metrics/tokenizer.json`` and
``metrics/figures/tokenizer/reconstructions.png`` (originals beside their reconstructions).

On held-out images (the val split when there is one, else the train split), view 0: PSNR, codebook usage and
perplexity, and the FD in the encoder's representation space between originals and reconstructions
(:mod:`pipeline.eval.tokenizer_eval`; the protocol in docs/metrics.md).
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core import distributed
from pipeline.core.artifacts import load_model, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.core.runtime import device_for
from pipeline.data.views import ViewRecipe
from pipeline.eval.tokenizer_eval import evaluate_tokenizer, held_out, reconstructions
from pipeline.gen.figures import interleave, save_png
import pipeline.models.encoder  # noqa: F401  (registers the "encoder" model kind)
import pipeline.models.vqgan  # noqa: F401  (registers the "tokenizer" model kind)

# What the result depends on; dvc.yaml tracks it (what_to_compute leaves; tests/test_dvc_deps.py writes them).
PARAMS = ["views", "tokenizer.eval"]


def run(params: Params) -> dict:
    d = distributed.init(params.runtime)
    out = params.paths.metrics / "tokenizer.json"
    summary = {}
    if d.is_main:
        started = time.perf_counter()
        for name, stage in (("tokenizer", "train-tokenizer"), ("encoder", "pretrain-encoder")):
            if not params.paths.model_file(name).is_file():
                raise RcgError(f"no {name} model at {params.paths.model_file(name)}: run `rcg {stage}` first")
        device = device_for(params.runtime)
        tokenizer, payload = load_model("tokenizer", params.paths.model_file("tokenizer"))
        encoder = load_model("encoder", params.paths.model_file("encoder"))[0].to(device)
        shards, rows = held_out(params.paths.shards, params.tokenizer.eval.num_images)
        metrics = evaluate_tokenizer(tokenizer, encoder, shards, rows, ViewRecipe(**params.views.model_dump()),
                                     params.tokenizer.eval.batch_size, device)
        write_json(out, {**metrics, "tokenizer": payload["summary"].get("source")})
        originals, recon = reconstructions(tokenizer, shards, rows[np.linspace(0, len(rows) - 1, 32).astype(int)], ViewRecipe(**params.views.model_dump()),
                                           device)
        picture = save_png(params.paths.metrics / "figures" / "tokenizer" / "reconstructions.png",
                           interleave(originals, recon, columns=4, cell=64))
        summary = {"metrics": str(out), **{k: metrics[k] for k in ("psnr", "usage", "perplexity", "fd_rep",
                                                                     "fd_rep_halves")},
                   "figure": str(picture), "seconds": round(time.perf_counter() - started, 2)}
    d.barrier()
    return summary
