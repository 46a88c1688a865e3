"""MoCo v3 ResNet encoder: torchvision's ResNet layout with the 2-layer projector as ``fc``.

The names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``), so MoCo v3's
official ResNet-50 file (``module.base_encoder.*``) loads strictly once that prefix is stripped. ``width``,
``layers`` and a small 3x3 stem make the same design cheap enough to pretrain on 32 px images on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.models.mlp import build_mlp


class ResidualBlock(nn.Module):
    """A residual branch (the subclass's ``residual``) plus the skip, then ReLU."""
    expansion = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + (self.downsample(x) if self.downsample is not None else x))


class BasicBlock(ResidualBlock):
    """Two 3x3 conv-BN layers and a skip (ResNet-18/34)."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample(c_in, width, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (strided) -> 1x1 conv-BN layers and a skip (ResNet-50 and up; torchvision's stride placement)."""
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample(c_in, c_out, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


def downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """The 1x1 conv-BN projection of the skip where the shape changes; None where the identity fits."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class MoCoResNet(nn.Module):
    """Stem, ``len(layers)`` stages (stage i: ``layers[i]`` blocks of ``width * 2**i`` channels, stride 2 after the
    first), global average pooling (the feature) and MoCo v3's ResNet projector as ``fc``.

    ``stem="imagenet"`` is torchvision's 7x7/2 conv and 3x3/2 max-pool (what official files carry); ``"conv3x3"``
    is one 3x3 conv at ``stem_stride`` for small images. MoCo v3 builds its ResNets with zero-initialised last BN
    of every residual branch, so each block starts as the identity.
    """

    def __init__(self, img_size: int = 32, block: str = "basic", layers: tuple[int, ...] = (1, 1, 1), width: int = 16,
                 stem: str = "conv3x3", stem_stride: int = 1, proj_hidden_dim: int = 512, proj_dim: int = 256):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown ResNet block {block!r} (choose from {', '.join(BLOCKS)})")
        if stem not in ("imagenet", "conv3x3"):
            raise ValueError(f"unknown ResNet stem {stem!r} (choose imagenet or conv3x3)")
        self.input_size = img_size
        kernel, stride, pad = (7, 2, 3) if stem == "imagenet" else (3, stem_stride, 1)
        self.conv1 = nn.Conv2d(3, width, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        cls, c = BLOCKS[block], width
        for i, n in enumerate(layers):
            stage = []
            for j in range(n):
                stage.append(cls(c, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
                c = width * 2 ** i * cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.feature_dim = c
        self.fc = build_mlp(2, c, proj_hidden_dim, proj_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, ResidualBlock):
                nn.init.zeros_(m.last_bn().weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature [B, feature_dim] of normalised images (the ResNet's avgpool output)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))

    def project(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
