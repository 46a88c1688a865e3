"""Encode throughput against the bare encoder forward, and peak memory at two dataset sizes.

    python bench/encode.py [--sizes 2000 8000] [--set key=value ...]

Each size runs in a fresh process: built-in shards of that size, a random-init encoder of the configured shape,
the encode stage's store build (``pipeline.models.view_encoder.build_rep_store``: throughput of its fill loop; the
stage's k-NN probe is not run), then the same model's forward on random tensors of the encode
batch (B x V views) in the same process. Target: ratio >= 0.85 (the data path is not the bottleneck) and the
larger size's peak RSS <= 1.2x the smaller's (memory stays flat as N grows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import builtin_shards, images_per_s  # noqa: E402
from pipeline.core.artifacts import save_model  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.models.encoder import build_encoder  # noqa: E402
from pipeline.core.runtime import configure, device_for  # noqa: E402


def make_inputs(root: Path, size: int, overrides: list[str]) -> list[str]:
    """Built-in shards of ``size`` images and a random-init encoder file; returns the params overrides."""
    import torch

    overrides = builtin_shards(root, size, overrides)
    params = load_params(None, overrides)
    config = params.encoder.model.model_dump()
    torch.manual_seed(0)
    save_model("encoder", params.paths.model_file("encoder"), {"model": config},
                    build_encoder(config).state_dict(), summary={"source": "bench"})
    return overrides


def child(overrides: list[str]) -> dict:
    """The measurement, in a fresh process so that its peak RSS is the encode stage's alone."""
    import torch

    from pipeline.core.distributed import Dist
    from pipeline.models.view_encoder import build_rep_store, encoder_fn
    params = load_params(None, overrides)
    configure(params.runtime)
    device = device_for(params.runtime)
    writer, summary = build_rep_store(params, Dist(), device)
    writer.finalize()

    model = build_encoder(params.encoder.model.model_dump()).to(device).eval()
    b, v, crop = params.encode.batch_size, params.views.count, params.views.crop
    fn = encoder_fn(model, device, params.encode.bf16)
    views = torch.randint(0, 256, (b, v, crop, crop, 3), dtype=torch.uint8)
    forward = images_per_s(fn, views, max(3, summary["images"] // b // 2))  # incl. the host -> device copy
    return {"size": summary["images"], "encode_img_s": summary["images_per_s"], "forward_img_s": round(forward, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_worker_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "device": device.type, "batch": b, "views": v, "workers": params.encode.workers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 8000])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key=value")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["RCG_PROGRESS"] = "0"
    if args.child:
        print(json.dumps(child(args.overrides)))
        return
    rows = []
    for size in args.sizes:
        root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
        try:
            overrides = make_inputs(root, size, args.overrides)
            cmd = [sys.executable, __file__, "--child", *[f"--set={o}" for o in overrides]]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(root)
    print(f"device {rows[0]['device']}, batch {rows[0]['batch']} x {rows[0]['views']} views, "
          f"{rows[0]['workers']} loader workers")
    print(f"{'images':>8} {'encode img/s':>13} {'forward img/s':>14} {'ratio':>6} {'peak RSS MiB':>13} "
          f"{'worker RSS MiB':>15}")
    for r in rows:
        print(f"{r['size']:>8} {r['encode_img_s']:>13.1f} {r['forward_img_s']:>14.1f} "
              f"{r['encode_img_s'] / r['forward_img_s']:>6.3f} {r['peak_rss_mib']:>13} {r['peak_worker_rss_mib']:>15}")
    print(f"peak RSS ratio (larger / smaller): {rows[1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
