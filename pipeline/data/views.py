"""The one definition of view ``v`` of image ``key``: what every store (reps, tokens) is computed on.

Stores are computed once, so RCG's training augmentation (resize, crop, flip) becomes V fixed views:
view 0 is the centre crop, view 1 its mirror (when ``flip``), and later views seeded random crops (with a
seeded flip). Randomness comes from a hash of (seed, key, v), never from a global RNG, so a view is the
same across runs, processes, ranks and machines. ``encode`` and ``tokenize`` both call :func:`make_view`,
which is why ``reps[i, v]`` and ``tokens[i, v]`` describe the same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipeline.data.images import decode_rgb, resize_short_side


@dataclass(frozen=True)
class ViewRecipe:
    count: int = 2
    resize: int = 32
    crop: int = 32
    flip: bool = True
    seed: int = 0

    def describe(self) -> dict:
        """What a store records so it is never reused with other views."""
        return {"function": "pipeline.data.views.make_view/v1", **asdict(self)}


def _draws(key: str, v: int, seed: int) -> tuple[float, float, bool]:
    digest = hashlib.sha256(f"{seed}/{key}/{v}".encode()).digest()
    a, b, c = (int.from_bytes(digest[i:i + 8], "little") for i in (0, 8, 16))
    return a / 2**64, b / 2**64, bool(c & 1)


def make_view(img: Image.Image, key: str, v: int, recipe: ViewRecipe) -> np.ndarray:
    """View ``v`` of an RGB image as uint8 [crop, crop, 3]."""
    if not 0 <= v < recipe.count:
        raise IndexError(f"view {v} out of range for {recipe.count} views")
    img = resize_short_side(img, recipe.resize)
    w, h = img.size
    c = recipe.crop
    mirrored = recipe.flip and v == 1
    if v == 0 or mirrored:  # torchvision CenterCrop rounding
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
    else:
        fx, fy, coin = _draws(key, v, recipe.seed)
        left, top = int(fx * (w - c + 1)), int(fy * (h - c + 1))
        mirrored = recipe.flip and coin
    out = np.asarray(img.crop((left, top, left + c, top + c)))
    return np.ascontiguousarray(out[:, ::-1]) if mirrored else out


def all_views(data: bytes, key: str, recipe: ViewRecipe) -> np.ndarray:
    """Every view of one stored image: uint8 [V, crop, crop, 3] (decoded and resized once)."""
    img = resize_short_side(decode_rgb(data), recipe.resize)
    return np.stack([make_view(img, key, v, recipe) for v in range(recipe.count)])
