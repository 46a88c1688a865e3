"""Cluster labels of stored representations: seeded k-means, the labels of the paper's "cluster labels" row
(Table 9a), where the pixel generator is conditioned on k-means ids of the reps instead of class labels."""

from __future__ import annotations

import torch

from pipeline.core.errors import RcgError


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.square().sum(1, keepdim=True) - 2 * x @ c.T + c.square().sum(1)).clamp_min_(0)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50,
           block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, D], labels [N]) of Lloyd's k-means on ``x`` [N, D] from a k-means++ start drawn with
    ``generator``: the same inputs and seed give the same labels. An emptied cluster restarts at the point
    farthest from its centroid. Stops early once no label changes."""
    n = len(x)
    if not 1 <= k <= n:
        raise RcgError(f"k-means needs 1 <= k <= N; got k={k} for {n} reps (pixel.cluster.k)")
    x = x.float()
    centroids = x[torch.randint(n, (1,), generator=generator, device=x.device)]
    d2 = _sq_dists(x, centroids)[:, 0]
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to d^2
        pick = torch.multinomial(d2 + 1e-12, 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
        d2 = torch.minimum(d2, _sq_dists(x, x[pick])[:, 0])
    labels = None
    for _ in range(iters):
        new, d2 = _assign(x, centroids, block)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        for empty in (counts == 0).nonzero().flatten().tolist():
            far = d2.argmax()
            centroids[empty] = x[far]
            d2[far] = 0
    return centroids, labels


def _assign(x: torch.Tensor, centroids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row and its squared distance, ``block`` rows at a time (never [N, k] at once)."""
    d2, labels = zip(*(_sq_dists(x[i:i + block], centroids).min(1) for i in range(0, len(x), block)))
    return torch.cat(labels), torch.cat(d2)
