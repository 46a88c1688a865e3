"""Fréchet distance (as torch-fidelity 0.4 computes FID), k-NN precision/recall and a cosine k-NN classifier
(DINO-style vote).

Used for the representation-space FD and precision/recall of RDM samples and for probing representations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


def _as_tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    return torch.as_tensor(a).to(device=device, dtype=dtype)


@torch.no_grad()
def knn_accuracy(features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, k: int = 20,
                 temperature: float = 0.07, queries: np.ndarray | torch.Tensor | None = None,
                 query_labels: np.ndarray | torch.Tensor | None = None, batch: int = 1024) -> float:
    """Accuracy in [0, 1] of a cosine-similarity k-NN classifier with weights exp(sim / temperature).

    ``features``/``labels`` are the reference set. Without ``queries`` it is leave-one-out over the
    reference set (each point's own similarity is excluded). Queries go ``batch`` at a time, so only a
    [batch, N] similarity block is ever held (200 MB at N = 50k). Runs on the device of ``features``.
    """
    device = features.device if isinstance(features, torch.Tensor) else None
    ref = F.normalize(_as_tensor(features, torch.float32, device), dim=1)
    ref_labels = _as_tensor(labels, torch.long, ref.device)
    leave_one_out = queries is None
    if leave_one_out:
        qry, qry_labels = ref, ref_labels
    else:
        if query_labels is None:
            raise ValueError("query_labels are required with queries")
        qry = F.normalize(_as_tensor(queries, torch.float32, ref.device), dim=1)
        qry_labels = _as_tensor(query_labels, torch.long, ref.device)
    num_classes = int(max(ref_labels.max(), qry_labels.max())) + 1
    k = min(k, len(ref) - int(leave_one_out))
    correct = 0
    for start in range(0, len(qry), batch):
        sim = qry[start:start + batch] @ ref.T
        if leave_one_out:
            rows = torch.arange(len(sim), device=sim.device)
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, ref_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(dim=1) == qry_labels[start:start + batch]).sum().item()
    return correct / len(qry)


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
