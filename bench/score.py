"""Scoring cost on CPU: images/s of each feature space's extractor, the judge's training, the reference statistics'
one-off cost and a whole ``score`` run, on the default run's built-in images (32 px).

    python -m bench.score ROOT [--images 4000] [--samples 1000] [--inception]

ROOT gets the shards (built-in set, default size, with its val split), a judge and an ssl_judge trained by their
stages, a random-init encoder of the default architecture (same cost as a trained one) and, with --inception, a
random-weights Inception file in torch-fidelity's layout, whose extraction rate alone is measured (Inception at 299 px
over the whole reference would take most of an hour on 2 CPU cores). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import run_stage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--inception", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    from pipeline.core.artifacts import save_model
    from pipeline.core.config import load_params
    from pipeline.data.eval_images import ShardImages
    from pipeline.data.sample_store import SampleWriter
    from pipeline.data.shards import ShardSet
    from pipeline.eval.fidelity import create_extractor, extract
    from pipeline.models.encoder import build_encoder

    root = a.root.resolve()
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = [f"paths.data={root}/data", f"paths.metrics={root}/metrics", f"data.builtin.num_train={a.images}",
                 f"runtime.threads={a.threads}"]
    inception = root / "weights-inception-random.pth"
    if a.inception and not inception.is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_fidelity import write_random_inception  # the test's random-weights file writer
        write_random_inception(inception)
    params = load_params(None, overrides)
    if not (root / "data" / "shards" / "index.parquet").is_file():
        run_stage("shard", params, root)
    enc = root / "data" / "models" / "encoder.pt"
    if not enc.is_file():
        torch.manual_seed(0)
        cfg = params.encoder.model.model_dump()
        save_model("encoder", enc, {"model": cfg}, build_encoder(cfg).state_dict(), summary={"source": "random"})
    judged = run_stage("train_judge", params, root)
    print(json.dumps({"what": "train_judge", "threads": torch.get_num_threads(), **judged}))
    ssl = run_stage("train_ssl_judge", params, root)
    print(json.dumps({"what": "train_ssl_judge", "threads": torch.get_num_threads(), **ssl}))

    shards = ShardSet(params.paths.shards, "train")
    batch = torch.stack([ShardImages(shards, 32)[i] for i in range(a.batch)])
    device = torch.device("cpu")
    spaces = ["judge", "encoder", "ssl_judge"] + (["inception"] if a.inception else [])
    weights = {"judge": root / "data" / "models" / "judge.pt", "encoder": enc,
               "ssl_judge": root / "data" / "models" / "ssl_judge.pt", "inception": inception}
    for s in spaces:
        fe = {s: create_extractor(s, weights[s], device)}
        reps = 1 if s == "inception" else 5
        extract(fe, [batch], device)  # warm-up
        start = time.perf_counter()
        extract(fe, [batch] * reps, device)
        rate = reps * len(batch) / (time.perf_counter() - start)
        print(json.dumps({"what": "extract", "space": s, "batch": len(batch), "images_per_s": round(rate, 1)}))

    for s in params.score.spaces:  # reference@<space>: one extractor per run
        ref = run_stage("reference", params, root, s)
        meta = json.loads((root / "data" / "reference" / f"{s}.json").read_text())
        print(json.dumps({"what": "reference", **ref, "images_per_s": meta["images_per_s"]}))

    val = ShardSet(params.paths.shards, "val")
    images = np.stack([ShardImages(val, 32)[i % len(val)].permute(1, 2, 0).numpy() for i in range(a.samples)])
    writer = SampleWriter(root / "data" / "samples" / "oracle.zarr", len(images), images.shape[1:], 100, {},
                          {"setting": "oracle", "models": {}, "seeds": [0]}, rep_dim=None, with_labels=False)
    for c in range(writer.num_chunks):
        r = writer.rows(c)
        writer.write(c, images[r.start:r.stop])
    writer.finalize()
    scored = run_stage("score", params, root, "oracle")
    print(json.dumps({"what": "score", "samples": a.samples, **scored}))


if __name__ == "__main__":
    main()
