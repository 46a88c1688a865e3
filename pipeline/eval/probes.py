"""Probes of what a set of representations knows: a cosine k-NN classifier (DINO-style vote)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
