"""Fréchet distance (as torch-fidelity 0.4 computes FID) and k-NN precision/recall of sample sets.

Used for the representation-space FD and precision/recall of RDM samples (probes of what representations
know live in :mod:`pipeline.eval.probes`).
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (np.cov, rowvar=False, unbiased) of [N, D] samples, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with the trace term from eigenvalues like
    torch-fidelity 0.4 (not scipy's sqrtm), all in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_between(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two [N, D] sample sets."""
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))


@torch.no_grad()
def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` ([N, D] each).

    Each point's k-NN radius (Euclidean, within its own set) spans a ball; precision is the fraction of fake points
    inside some real ball (fidelity), recall the fraction of real points inside some fake ball (coverage). Where
    FD sees only mean and covariance, these see the shape: a Gaussian fit to reps that lie on a sphere scores
    an FD near a perfect model's but a precision near 0. Only [batch, N] distance blocks are held.
    """
    real, fake = real.float(), fake.to(real).float()

    def radii(x: torch.Tensor) -> torch.Tensor:  # k-th neighbour besides the point itself
        return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), batch)])

    def covered(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor) -> float:
        inside = [(torch.cdist(points[i:i + batch], centres) <= radius).any(dim=1) for i in range(0, len(points), batch)]
        return torch.cat(inside).float().mean().item()

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))
