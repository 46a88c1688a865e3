"""MoCo v3's augmentation (BYOL's asymmetric view pair): random-resized crops per image on the loader side, colour
jitter, grayscale, blur, solarize and flip on whole batches (the encoder's and the ssl_judge's pretraining)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class TwoCropAugment:
    """MoCo v3's asymmetric view pair (BYOL recipe) in two halves: :meth:`crops` per image on the loader side (the
    random-resized crop, which needs each image's own size), and :meth:`views` on whole batches (colour jitter,
    grayscale, blur, solarize, flip), as tensor ops with per-sample parameters.

    Per image, torchvision's transforms cost ~9 ms a pair at 32 px, which made the augmentation, not the ViT, the
    cost of pretraining on a CPU; batched they cost ~0.75 ms a pair (bench/RESULTS.md). Differences from torchvision's
    ``ColorJitter``: its four adjustments run in a fixed order (brightness, contrast, saturation, hue) instead
    of a random one per image. Blur sigma (0.1-2.0 at 224 px) and kernel (~10% of the side) scale with
    ``image_size``, so small images keep their content.
    """

    def __init__(self, image_size: int, crop_min: float = 0.08, hue: float = 0.1, grayscale: float = 0.2):
        self.image_size, self.crop_min, self.hue, self.grayscale = image_size, crop_min, hue, grayscale
        s = image_size / 224
        self.blur_kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        self.blur_sigma = (0.1 * s, 2.0 * s)

    def crops(self, img: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two random-resized crops of one PIL image -> two uint8 [3, S, S] tensors (S = ``image_size``)."""
        return tuple(random_resized_crop(img, self.image_size, (self.crop_min, 1.0), rng) for _ in range(2))

    def views(self, crops1: torch.Tensor, crops2: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 crop batches [B, 3, S, S] -> the two float [0, 1] view batches: view 1 always blurred and never
        solarized, view 2 blurred with p 0.1 and solarized with p 0.2 (BYOL's asymmetry)."""
        return (self._view(crops1, generator, blur_p=1.0, solarize_p=0.0),
                self._view(crops2, generator, blur_p=0.1, solarize_p=0.2))

    def _view(self, crops: torch.Tensor, g: torch.Generator, blur_p: float, solarize_p: float) -> torch.Tensor:
        x = crops.float() / 255
        b = len(x)

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return (lo + (hi - lo) * torch.rand(b, generator=g, device=x.device))[:, None, None, None]

        def chance(p: float) -> torch.Tensor:
            return (torch.rand(b, generator=g, device=x.device) < p)[:, None, None, None]

        jitter = chance(0.8)
        brightness, contrast, saturation = uniform(0.6, 1.4), uniform(0.6, 1.4), uniform(0.8, 1.2)
        hue = uniform(-self.hue, self.hue)[:, 0]
        y = (x * brightness).clamp(0, 1)
        mean = grayscale(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * contrast + mean).clamp(0, 1)
        grey = grayscale(y)
        y = ((y - grey) * saturation + grey).clamp(0, 1)
        h, s, v = rgb_to_hsv(y)
        y = hsv_to_rgb((h + hue) % 1.0, s, v)
        x = torch.where(jitter, y, x)
        x = torch.where(chance(self.grayscale), grayscale(x).expand_as(x), x)
        sigma = uniform(*self.blur_sigma)[:, 0, 0, 0]
        x = torch.where(chance(blur_p), gaussian_blur(x, self.blur_kernel, sigma), x)
        x = torch.where(chance(solarize_p) & (x >= 128 / 255), 1 - x, x)
        return torch.where(chance(0.5), x.flip(-1), x)


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop box (10 tries at a random area and aspect, else the centre crop of the
    clamped aspect), resized to ``size`` x ``size`` by PIL (bilinear, antialiased) -> uint8 [3, size, size]."""
    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            break
    else:
        aspect = width / height
        w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
            (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
        w, h = min(w, width), min(h, height)
        top, left = (height - h) // 2, (width - w) // 2
    crop = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB batches [B, 3, H, W] -> [B, 1, H, W] (torchvision's weights)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RGB [B, 3, H, W] in [0, 1] -> hue (in turns), saturation, value, each [B, H, W]."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    return torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h)), s, maxc


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv` -> RGB [B, 3, H, W]."""
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    index = (sector.long() % 6)[:, None]
    table = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))  # R, G, B per sector 0..5
    return torch.cat([torch.stack(row, 1).gather(1, index) for row in table], 1)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per sample [B] and reflect padding (torchvision's)."""
    b, c, height, width = x.shape
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, kernel]
    y = F.pad(x.reshape(1, b * c, height, width), [kernel // 2] * 4, mode="reflect")
    y = F.conv2d(y, weights[:, None, :, None], groups=b * c)
    return F.conv2d(y, weights[:, None, None, :], groups=b * c).view(b, c, height, width)
