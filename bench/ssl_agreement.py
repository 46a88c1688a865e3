"""Does the ssl_judge order image sets as the label judge does? Judge FID and ssl FD of degraded copies of the val
split (noise, blur, darkening, a shift) against the train reference, and the Spearman rank correlation of the two.

    python -m bench.ssl_agreement ROOT

ROOT holds what the default params make there (``paths.data = ROOT/data``): shards with a val split, ``judge.pt``
and ``ssl_judge.pt`` (``rcg train-judge``, ``rcg train-ssl-judge``) and their references (``rcg reference judge``,
``rcg reference ssl_judge``). Prints one table row per image set, then the correlation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    a = ap.parse_args()
    from pipeline.core.config import load_params
    from pipeline.data.eval_images import ShardImages
    from pipeline.data.shards import ShardSet
    from pipeline.eval.fidelity import FD_KEY, Reference, create_extractor, extract, score_features
    from pipeline.data.augment import gaussian_blur

    root = a.root.resolve()
    params = load_params(None, [f"paths.data={root}/data", f"paths.metrics={root}/metrics"])
    val = ShardSet(params.paths.shards, "val")
    x = torch.stack([ShardImages(val, params.views.crop)[i] for i in range(len(val))])
    gen = torch.Generator().manual_seed(0)

    def as_uint8(y: torch.Tensor) -> torch.Tensor:
        return y.round().clamp(0, 255).to(torch.uint8)

    def blur(sigma: float) -> torch.Tensor:
        return as_uint8(gaussian_blur(x.float() / 255, 5, torch.full((len(x),), sigma)) * 255)

    sets = {"real (held out)": x}
    sets |= {f"noise {s}": as_uint8(x.float() + s * torch.randn(x.shape, generator=gen)) for s in (10, 25, 50)}
    sets |= {f"blur {s}": blur(s) for s in (0.7, 1.2, 2.0)}
    sets |= {f"brightness x{f}": as_uint8(x.float() * f) for f in (0.8, 0.5)}
    sets["shift 4 px"] = torch.roll(x, 4, dims=3)
    device = torch.device("cpu")
    figures: dict[str, dict[str, float]] = {name: {} for name in sets}
    for space in ("judge", "ssl_judge"):
        extractor = create_extractor(space, params.paths.model_file(space), device)
        with np.load(params.paths.data / "reference" / f"{space}.npz") as npz:
            ref = Reference("train", npz["mu"], npz["sigma"], torch.from_numpy(npz["features"]))
        for name, images in sets.items():
            feats = extract({space: extractor}, images.split(100), device)[space]
            scores = score_features(space, feats, ref, ref, params.score.isc_splits, params.score.kid_subsets,
                                    len(images), params.score.prc_k, params.score.min_samples, params.seed)
            figures[name][space] = scores[FD_KEY[space]]
    print("| images | judge FID | ssl FD |\n|---|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['judge']:.2f} | {f['ssl_judge']:.3f} |")
    ranks = [np.argsort(np.argsort([f[space] for f in figures.values()])) for space in ("judge", "ssl_judge")]
    print(f"Spearman rank correlation: {np.corrcoef(*ranks)[0, 1]:.3f}")


if __name__ == "__main__":
    main()
