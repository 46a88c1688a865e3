"""MoCo v3's MLP heads (projector and predictor), shared by the encoders and the ssl_judge."""

from __future__ import annotations

import torch.nn as nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: [Linear(no bias), BN, ReLU] x (n-1), Linear(no bias), then BN(affine=False) if ``last_bn``
    (MoCo v3 drops it only from the ResNet's predictor)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d2 = out_dim if last else hidden_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)
