"""RDM sample quality: the stage's FD ratio for the official formulation vs the default one, on a run's store.

    python -m bench.rdm_fd RUN_DIR [--variants official default] [--evals 3] [--num-samples M ...] [--set key=value ...]

RUN_DIR holds params.yaml and the reps.zarr it names (a `dvc repro` / `rcg encode` run). Every variant trains
from scratch with the stage's own loop (``pipeline.train.rdm.train_rdm``) under RUN_DIR's params plus the variant's
overrides plus ``--set``, in a scratch folder (no resume state or curves land in RUN_DIR), then the stage's own
evaluation runs ``--evals`` times with different sampling seeds: the FD of M generated reps, the i.i.d. lower
bound (mean of ``rdm.eval.lower_bound_draws`` draws), their ratio, the Gaussian fit's FD and precision/recall,
for each M in ``--num-samples`` (default: the params' M). One draw of M generated reps is as noisy as one draw of
real ones (the bound's spread), hence several.

Variants:
- official: raw reps, plain x0 loss (RCG's formulation; the ImageNet presets)
- default:  the default run's RDM: the reps whitened with power 0.15 and the Min-SNR-5 x0 loss
- others: any ``name:key=value,key=value`` on top of RUN_DIR's params, e.g. ``ms_only:rdm.model.whiten_power=0``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.distributed import Dist  # noqa: E402
from pipeline.data.rep_store import load_store, store_stats  # noqa: E402
from pipeline.eval.rdm_eval import evaluate  # noqa: E402
from pipeline.train.rdm import train_rdm  # noqa: E402

VARIANTS = {
    "official": ["rdm.model.whiten_power=0", "rdm.train.min_snr_gamma=null"],
    "default": ["rdm.model.whiten_power=0.15", "rdm.train.min_snr_gamma=5"],
}


def variant(spec: str) -> tuple[str, list[str]]:
    name, _, sets = spec.partition(":")
    if not sets and name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: use one of {', '.join(VARIANTS)} or name:key=value,...")
    return name, VARIANTS[name] if not sets else [s for s in sets.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--variants", nargs="+", default=["official", "default"])
    ap.add_argument("--evals", type=int, default=3, help="evaluations with different sampling seeds")
    ap.add_argument("--num-samples", type=int, nargs="+", default=None, help="M values to evaluate at")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    os.chdir(args.run_dir)
    device = torch.device("cpu")
    base = load_params(Path("params.yaml"), args.overrides)
    store = load_store(base.paths.reps, base.rdm.model, device)
    stats = store_stats(store.reps)
    for spec in args.variants:
        name, sets = variant(spec)
        with tempfile.TemporaryDirectory() as tmp:
            scratch = [f"paths.data={tmp}/data", f"paths.metrics={tmp}/metrics"]
            params = load_params(Path("params.yaml"), [*args.overrides, *sets, *scratch])
            model, ema, _, summary = train_rdm(params, store, stats, device, Dist())
        for m in args.num_samples or [params.rdm.eval.num_samples]:
            at_m = load_params(Path("params.yaml"), [*args.overrides, *sets, f"rdm.eval.num_samples={m}"])
            evals = [evaluate(at_m.rdm, params.seed + 1000 * i, model, ema, store, stats, device)
                     for i in range(args.evals)]
            fd = [e["fd_generated"] for e in evals]
            low = [e["fd_lower_bound"] for e in evals]
            print(json.dumps({"variant": name, "sets": sets, "steps": params.rdm.train.steps,
                              "train_seconds": summary["seconds"], "num_samples": m,
                              "fd_generated": [round(f, 4) for f in fd], "fd_lower_bound": round(float(np.mean(low)), 4),
                              "fd_lower_bound_std": round(float(np.mean([e["fd_lower_bound_std"] for e in evals])), 4),
                              "ratio": round(float(np.mean(fd) / np.mean(low)), 3),
                              "ratios": [round(e["ratio"], 3) for e in evals],
                              "fd_gaussian_fit": round(float(np.mean([e["fd_gaussian_fit"] for e in evals])), 4),
                              **{key: [round(e[key], 3) for e in evals]
                                 for key in ("precision", "recall", "precision_real", "recall_real",
                                             "precision_gaussian_fit", "recall_gaussian_fit")},
                              **({"class_agreement": [round(e["class_agreement"], 3) for e in evals],
                                  "class_agreement_real": [round(e["class_agreement_real"], 3) for e in evals]}
                                 if "class_agreement" in evals[0] else {})}), flush=True)


if __name__ == "__main__":
    main()
