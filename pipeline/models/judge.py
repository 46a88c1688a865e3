"""The judge: a small supervised CNN classifier of the training images, used only to score samples.

RCG's generators are conditioned on the encoder's representations, so scoring them in that space favours them.
The judge learns from labels instead; FID on its penultimate features and IS on its class probabilities are
the default run's headline figures (pipeline.eval.fidelity registers it with torch-fidelity).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.artifacts import register_model_kind

MODEL_FORMAT = "rcg-judge"


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Judge(nn.Module):
    """``stages`` blocks of 3x3 conv-BN-ReLU + 2x2 max-pool (block i has ``width * 2**i`` channels), then global
    average pooling (the penultimate features) and a linear classifier. One conv per block: on 2 CPU cores it
    trains to ~95% val accuracy on the built-in set in a minute, where two per block took three times as long."""

    def __init__(self, img_size: int = 32, num_classes: int = 10, width: int = 16, stages: int = 4):
        super().__init__()
        self.img_size, self.num_classes = img_size, num_classes
        layers: list[nn.Module] = []
        c = 3
        for i in range(stages):
            c_out = width * 2 ** i
            layers += conv_bn(c, c_out) + [nn.MaxPool2d(2)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.feature_dim = c
        self.head = nn.Linear(c, num_classes)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] of images in [0, 1] at ``img_size``."""
        return self.body((x01 - 0.5) / 0.5).mean(dim=(2, 3))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x01))


def judge_input(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [0, 1] at ``img_size`` (bilinear, antialiased, only when the size differs):
    what the judge sees in training and in scoring alike."""
    x = images.float().div(255)
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _from_file(payload: dict, path: str | Path) -> Judge:
    """The frozen judge of an "rcg-judge" model file (``load_model("judge", path)``)."""
    model = Judge(**payload["config"]["model"])
    model.load_state_dict(payload["state_dict"])
    return model.requires_grad_(False)


register_model_kind("judge", MODEL_FORMAT, _from_file)
