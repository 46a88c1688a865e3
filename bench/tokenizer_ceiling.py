"""The tokenizer's ceiling: the held-out images of compare's ``real`` row, encoded to tokens and decoded again,
scored exactly like a generator (same rows, crop, spaces and references as ``rcg score real``).

A generator over these tokens that predicted every token perfectly would draw these images, so this row bounds
what any pixel generator of the project can reach, and splits a table's gap to the real row into the tokenizer's
part and the generator's. Run it in a project after ``dvc repro`` (it reads the params, the shards, the tokenizer
and the references there):

    python -m bench.tokenizer_ceiling [--params params.yaml] [--set key=value ...] [--out ceiling.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

import torch

from pipeline.core.artifacts import load_model, write_json
from pipeline.core.config import load_params
from pipeline.core.runtime import device_for
from pipeline.eval.fidelity import SampleSource, extractor_weights, scored_spaces
from pipeline.models import vqgan  # noqa: F401  (registers the "tokenizer" model kind)
from pipeline.models.vqgan import VQGAN
from stages.score import check_enough, headline, held_out_source, reference_meta, score_source, stage_references


@torch.no_grad()
def through_tokens(tokenizer: VQGAN, batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, R, R] batches -> the same images after encode -> nearest codes -> decode, uint8 again."""
    for batch in batches:
        x = batch.to(device).float().div(255)
        rec = tokenizer.decode_indices(tokenizer.encode_to_indices(x)).clamp(0, 1)
        yield rec.mul(255).round().to(torch.uint8).cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override key.path=value (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    params = load_params(args.params, args.set)
    device = device_for(params.runtime)
    tokenizer, _ = load_model("tokenizer", params.paths.model_file("tokenizer"))
    tokenizer = tokenizer.to(device).eval()
    real = held_out_source(params)
    source = SampleSource(real.path, real.count, real.resolution,
                          lambda batch_size: through_tokens(tokenizer, real.batches(batch_size), device),
                          {"split": "val", "through": "tokenizer"})
    spaces = scored_spaces(params.score)
    check_enough(source, spaces, params.score)
    meta = reference_meta(params, spaces, source.resolution)
    weights = {s: extractor_weights(params, s) for s in spaces}
    scores, seconds = score_source(source, spaces, weights,
                                   lambda dims: stage_references(params, spaces, meta, dims), params)
    result = {"row": "tokens (held-out images through the tokenizer)", "num_samples": source.count,
              "seconds": round(seconds, 2), **scores}
    if args.out is not None:
        write_json(args.out, result)
    print(json.dumps({"num_samples": source.count, **headline(scores)}, indent=1))


if __name__ == "__main__":
    main()
