"""Where a trained RDM's Fréchet distance comes from, in a run folder that has reps.zarr and models/rdm.pt.

    python -m bench.rdm_diagnose RUN_DIR [--samples 2000] [--sampler 250:1 500:1 250:0] [--set key=value ...]

Prints (1) the store's covariance spectrum and the sampler's own floor (the FD an exact Gaussian model gets under
each DDIM setting, in closed form, in the model's whitened space), (2) the model's x0 error (EMA weights, in the
store's space) per timestep next to the error of just returning x_t / sqrt(abar_t) (a floor above that at small
t means the net has not learned the near-identity there), (3) for each DDIM setting (steps:eta), the FD to the
store and its split by eigen-subspace of the store's covariance, next to the same for M real reps (the lower
bound), and the generated variance along a few eigen-directions. bench/RESULTS.md quotes its output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_params  # noqa: E402
from pipeline.eval.metrics import frechet_distance, gaussian_stats  # noqa: E402
import pipeline.models.rdm  # noqa: E402,F401  (registers the "rdm" model kind)
from pipeline.core.artifacts import load_model  # noqa: E402
from pipeline.models.diffusion import GaussianDiffusion  # noqa: E402
from pipeline.samplers.diffusion import ddim_schedule, sample_reps  # noqa: E402
from pipeline.data.rep_store import load_store, store_stats  # noqa: E402
from pipeline.eval.rdm_eval import draw_reps  # noqa: E402
from pipeline.core.rng import seeded_generator  # noqa: E402

SUBSPACES = (5, 10, 20, 40, 80, 256)
DIRECTIONS = (0, 5, 10, 20, 40, 80, 160, 240)


def projected_fd(stats: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], basis: np.ndarray) -> float:
    (mu, sigma), (mu_r, sigma_r) = stats, ref
    return frechet_distance(basis.T @ mu, basis.T @ sigma @ basis, basis.T @ mu_r, basis.T @ sigma_r @ basis)


def sampler_floor(diffusion, eigval: np.ndarray, scale: np.ndarray, steps: int, eta: float) -> float:
    """Population FD of an *exact* Gaussian model under DDIM(steps, eta) as the stage samples (the noisy x at
    abar_0 returned), in closed form: per eigen-direction (variance eigval / scale^2 in the RDM's space) every
    step is linear, so the variance recursion V <- k^2 V + sigma^2 from V_T = 1 gives the sampled variance."""
    tau, a_prev, sigma = ddim_schedule(diffusion, steps, eta)
    abar = diffusion.alphas_cumprod.double().numpy()
    lam = np.clip(eigval, 0, None) / scale ** 2
    var = np.ones_like(lam)
    for i in reversed(range(len(tau))):
        a_t, a_p, s = abar[tau[i]], float(a_prev[i]), float(sigma[i])
        gain = np.sqrt(a_t) * lam / (a_t * lam + 1 - a_t)  # the Gaussian's x0_hat = gain * x_t
        eps = (1 / np.sqrt(a_t) - gain) / np.sqrt(1 / a_t - 1)  # and eps_hat = eps * x_t
        var = (np.sqrt(a_p) * gain + np.sqrt(max(1 - a_p - s ** 2, 0.0)) * eps) ** 2 * var + s ** 2
    return float(np.sum(scale ** 2 * (np.sqrt(var) - np.sqrt(lam)) ** 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--sampler", nargs="+", default=["250:1"], help="DDIM steps:eta settings to compare")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    os.chdir(args.run_dir)
    params = load_params(Path("params.yaml"), args.overrides)
    device = torch.device("cpu")
    store = load_store(params.paths.reps, params.rdm.model, device)
    model, payload = load_model("rdm", params.paths.model_file("rdm"))  # EMA weights, as RCG samples
    config = payload["config"]
    diffusion = GaussianDiffusion(**config["diffusion"])
    n, v, dim = store.shape
    m = args.samples

    ref = store_stats(store.reps)
    eigval, eigvec = np.linalg.eigh(ref[1])
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    frac = np.cumsum(eigval) / eigval.sum()
    print(f"store [{n}, {v}, {dim}]: top eigenvalues {np.round(eigval[:5], 2).tolist()}; "
          f"variance in the top 10 / 20 directions {frac[9]:.3f} / {frac[19]:.3f}")
    print("  eigenvalue at " + ", ".join(f"{i}: {eigval[i]:.4f}" for i in DIRECTIONS if i < dim))
    # the model's whitening scales eigen-direction i by 1/scale_i (its PCA basis is the store's)
    white = model.whitening
    scale = 1 / np.linalg.norm((white.forward_map.double() @ torch.from_numpy(eigvec.copy())).numpy(), axis=0)
    floors = []
    for setting in args.sampler:
        steps, eta = setting.split(":")
        floors.append(f"DDIM {setting}: {sampler_floor(diffusion, eigval, scale, int(steps), float(eta)):.4f}")
    print("sampler floor (FD of an exact Gaussian model, closed form): " + ", ".join(floors))

    gen = seeded_generator(device, params.seed, 3)
    real, rows = draw_reps(store, m, gen)  # i.i.d., like the stage's lower bound
    labels = store.labels[rows] if config["model"]["class_cond"] else torch.zeros(m, dtype=torch.long)
    with torch.no_grad():
        print("x0 MSE per dimension by timestep, in the store's space (model / x_t / sqrt(abar_t) mapped back):")
        z0 = white.encode(real)  # the model works in its whitened space
        for t in (1, 5, 20, 50, 100, 200, 400, 600, 800, 999):
            tt = torch.full((m,), t)
            z_t = diffusion.q_sample(z0, tt, torch.randn(z0.shape, generator=gen))
            err = (white.decode(model(z_t, tt, labels)) - real).pow(2).mean().item()
            abar = diffusion.alphas_cumprod[t].item()
            ident = (white.decode(z_t / abar ** 0.5) - real).pow(2).mean().item()
            print(f"  t {t:4d}: {err:.5f} / {ident:.5f}")

        real_stats = gaussian_stats(real.cpu().numpy())
        print("FD to the store, total and within the top-k eigen-directions (k = " + ", ".join(map(str, SUBSPACES)) + "):")
        print(f"  real {m:>6}: " + "  ".join(f"{projected_fd(real_stats, ref, eigvec[:, :k]):.4f}" for k in SUBSPACES))
        for setting in args.sampler:
            steps, eta = setting.split(":")
            fake = sample_reps(model, diffusion, labels, steps=int(steps), eta=float(eta),
                               generator=seeded_generator(device, params.seed, 4))
            stats = gaussian_stats(fake.cpu().numpy())
            spread = np.einsum("ij,jk,ki->i", eigvec.T, stats[1], eigvec)
            print(f"  DDIM {setting:>6}: " + "  ".join(f"{projected_fd(stats, ref, eigvec[:, :k]):.4f}" for k in SUBSPACES)
                  + f"   mean term {float(((stats[0] - ref[0]) ** 2).sum()):.4f}")
            print("    generated / store variance along eigen-direction "
                  + ", ".join(f"{i}: {spread[i] / max(eigval[i], 1e-12):.2f}" for i in DIRECTIONS if i < dim))


if __name__ == "__main__":
    main()
