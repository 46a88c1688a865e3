"""Tokenize throughput against the bare VQGAN encoder forward (+ quantiser), at two sizes.

    python bench/tokenizer.py [--sizes default imagenet] [--images N] [--set key=value ...]

Each size runs in a fresh process: built-in shards, a random-init tokenizer file of that size's architecture,
the tokenize stage's store build (``build_token_store``, throughput of its fill loop: shard reads, PNG decode,
views, loader, Zarr writes), then ``encode_to_indices`` of the same model on random uint8 views of the stage's
batch (B x V views, incl. the uint8 -> float conversion) in the same process. Target: ratio >= 0.85.

- default: the default run (32x32 built-in images, ``tokenizer.model`` defaults), 2048 images.
- imagenet: the official VQGAN architecture (54.5M params, f=16) on 256x256 crops, MAGE's one view
  (imagenet256_vitb_mage), 8 built-in images rendered at 256 px, batch 4: a few forwards, as a CPU can afford.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Keep bench/ itself off sys.path (the repo root is what the imports need).
sys.path[0] = str(Path(__file__).resolve().parents[1])
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

from bench.common import builtin_shards, images_per_s  # noqa: E402
from pipeline.core.artifacts import save_model  # noqa: E402
from pipeline.core.config import load_params, preset  # noqa: E402
from pipeline.core.runtime import configure, device_for  # noqa: E402

SIZES = {
    "default": (2048, []),
    "imagenet": (8, ["data.builtin.image_size=256", "tokenize.batch_size=4", "tokenize.chunk_size=8",
                     *[f"views.{k}={v}" for k, v in preset("imagenet256_vitb_mage").views.model_dump().items()],
                     *[f"tokenizer.model.{k}={v}" for k, v in
                       preset("imagenet256_vitb_mage").tokenizer.model.model_dump().items()]]),
}


def make_inputs(root: Path, images: int, overrides: list[str]) -> list[str]:
    """Built-in shards and a random-init tokenizer file; returns the params overrides."""
    import torch

    from pipeline.models.vqgan import VQGAN, model_kwargs
    overrides = builtin_shards(root, images, overrides)
    params = load_params(None, overrides)
    kwargs = model_kwargs(params.tokenizer.model)
    torch.manual_seed(0)
    save_model("tokenizer", params.paths.model_file("tokenizer"), {"model": kwargs}, VQGAN(**kwargs).state_dict(),
                    summary={"source": "bench"})
    return overrides


def child(overrides: list[str]) -> dict:
    import torch

    from pipeline.core.distributed import Dist
    from pipeline.models.view_tokenizer import build_token_store, load_frozen_tokenizer, tokenizer_fn
    params = load_params(None, overrides)
    configure(params.runtime)
    device = device_for(params.runtime)
    writer, summary = build_token_store(params, Dist(), device)
    writer.finalize()

    model = load_frozen_tokenizer(params.paths.model_file("tokenizer"), device)[0]
    b, v, crop = params.tokenize.batch_size, params.views.count, params.views.crop
    fn = tokenizer_fn(model, device, params.tokenize.bf16)
    views = torch.randint(0, 256, (b, v, crop, crop, 3), dtype=torch.uint8)
    forward = images_per_s(fn, views, max(2, summary["images"] // b // 2))
    return {"images": summary["images"], "tokenize_img_s": summary["images_per_s"], "forward_img_s": round(forward, 2),
            "device": device.type, "batch": b, "views": v, "crop": crop, "workers": params.tokenize.workers,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--images", type=int, help="override the number of images of every size")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key=value")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["RCG_PROGRESS"] = "0"
    if args.child:
        print(json.dumps(child(args.overrides)))
        return
    print(f"{'size':>9} {'params':>7} {'crop':>5} {'batch':>9} {'workers':>7} {'images':>7} {'tokenize img/s':>15} "
          f"{'forward img/s':>14} {'ratio':>6}")
    for name in args.sizes:
        images, overrides = SIZES[name]
        root = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
        try:
            overrides = make_inputs(root, args.images or images, [*overrides, *args.overrides])
            cmd = [sys.executable, __file__, "--child", *[f"--set={o}" for o in overrides]]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(root)
        print(f"{name:>9} {r['params_m']:>6}M {r['crop']:>5} {r['batch']:>5} x {r['views']:<1} {r['workers']:>7} "
              f"{r['images']:>7} {r['tokenize_img_s']:>15.2f} {r['forward_img_s']:>14.2f} "
              f"{r['tokenize_img_s'] / r['forward_img_s']:>6.3f}  ({r['device']}, {r['threads']} threads)", flush=True)


if __name__ == "__main__":
    main()
