"""The tokenizer's ceiling: the held-out images of compare's ``real`` row, encoded to tokens and decoded again,
scored like a generator (the same rows and crop as ``rcg score real``, the same spaces, extractors and reference
statistics, through ``rcg score --samples``).

A generator over these tokens that predicted every token right would draw these images, so this row bounds what
any pixel generator of the project can reach, and splits a table's gap to the real row into the tokenizer's part
and the generator's. Run it in a project after ``dvc repro`` (it reads the params, the shards, the tokenizer and
the references there):

    python -m bench.tokenizer_ceiling [--params params.yaml] [--set key=value ...] [--out ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.core.artifacts import load_model
from pipeline.core.config import load_params
from pipeline.core.errors import RcgError
from pipeline.core.runtime import device_for
from pipeline.data.eval_images import ShardImages, evenly_spaced
from pipeline.data.shards import ShardSet
from pipeline.eval.fidelity import reference_dir, scored_spaces
from pipeline.models import vqgan  # noqa: F401  (registers the "tokenizer" model kind)


@torch.no_grad()
def write_through_tokens(params, out: Path) -> int:
    """The real row's images (val split, evenly spaced, centre crops) through the tokenizer, as PNGs in ``out``."""
    device = device_for(params.runtime)
    tokenizer, _ = load_model("tokenizer", params.paths.model_file("tokenizer"))
    tokenizer = tokenizer.to(device).eval()
    val = ShardSet(params.paths.shards, "val")
    images = ShardImages(val, params.views.crop, evenly_spaced(len(val), params.sample.num_samples))
    count = 0
    for batch in DataLoader(images, batch_size=params.score.batch_size):
        x = batch.to(device).float().div(255)
        rec = tokenizer.decode_indices(tokenizer.encode_to_indices(x)).clamp(0, 1)
        for image in rec.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
            Image.fromarray(image).save(out / f"{count:06d}.png")
            count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override key.path=value (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    params = load_params(args.params, args.set)
    spaces = scored_spaces(params.score)
    npz = {s: reference_dir(params) / f"{s}.npz" for s in spaces}
    missing = [str(p) for p in npz.values() if not p.is_file()]
    if missing:
        raise RcgError(f"no reference statistics at {', '.join(missing)}: run `dvc repro` first")
    with tempfile.TemporaryDirectory(prefix="tokenizer-ceiling-") as tmp:
        count = write_through_tokens(params, Path(tmp))
        out = Path(tmp) / "scores.json"
        cmd = [sys.executable, "-m", "stages.cli", "score", "--params", args.params, "--samples", tmp,
               "--out", str(out), *[a for s in spaces for a in ("--reference-npz", f"{s}={npz[s]}")],
               *[a for kv in args.set for a in ("--set", kv)]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        scores = json.loads(out.read_text())
    result = {"row": "tokens: the real row's images through the tokenizer", "num_samples": count,
              **{s: scores[s] for s in spaces}}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"num_samples": count, **{f"{s}_{k}": scores[s][k] for s in spaces
                                               for k in ("fid", "fd", "isc") if k in scores[s]}}, indent=1))


if __name__ == "__main__":
    main()
