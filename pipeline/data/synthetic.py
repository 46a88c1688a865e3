"""The built-in dataset: small RGB images of coloured shapes on textured backgrounds.

It has what a self-supervised encoder can learn and a generator can be judged on: the class is the shape
(10 kinds), while colour, size, position, rotation and background texture vary freely. Image ``i`` depends
only on (seed, split, i), so the set is identical on every machine and for any worker count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "crescent", "bar"]
SUPERSAMPLE = 4


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list:
    """Regular polygon (or star when ``inner`` is set) centred at (cx, cy)."""
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = r if (inner is None or k % 2 == 0) else r * inner
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A background: stripes, checks, smooth noise or a gradient, in two close, muted colours.

    Low contrast on purpose: two crops of one image share its background, so a loud texture would let a
    self-supervised encoder tell images apart by texture alone and never learn the shapes.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    c1 = rng.uniform(0.05, 0.55, 3)
    c2 = np.clip(c1 + rng.uniform(-0.12, 0.12, 3), 0, 1)
    kind = rng.integers(4)
    if kind == 0:
        a, f = rng.uniform(0, math.pi), rng.uniform(3, 9)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a)))
    elif kind == 1:
        f = rng.integers(2, 7)
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(float)
    elif kind == 2:
        g = rng.uniform(0, 1, (5, 5))
        t = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255
    else:
        a = rng.uniform(0, 2 * math.pi)
        t = np.clip(0.5 + (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a), 0, 1)
    img = c1 * t[..., None] + c2 * (1 - t[..., None])
    return (img * 255).astype(np.uint8)


def render(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of shape ``CLASSES[label]``."""
    big = size * SUPERSAMPLE
    background = Image.fromarray(_texture(rng, big))
    img = background.copy()
    draw = ImageDraw.Draw(img)
    hue_rgb = rng.uniform(0, 1, 3)
    hue_rgb[rng.integers(3)] = rng.uniform(0.85, 1.0)  # bright, so it stands out from the background
    color = tuple(int(c * 255) for c in hue_rgb)
    r = big * rng.uniform(0.2, 0.36)
    cx, cy = (big / 2 + big * rng.uniform(-0.15, 0.15, 2))
    rot = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, fill=color)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=color)
    elif name == "diamond":
        pts = _polygon(cx, cy, r, 4, rot)
        draw.polygon([(cx + (x - cx) * (0.55 if k % 2 else 1.0), cy + (y - cy) * (0.55 if k % 2 else 1.0))
                      for k, (x, y) in enumerate(pts)], fill=color)
    elif name == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy, px, py = math.cos(a) * r, math.sin(a) * r, -math.sin(a) * w, math.cos(a) * w
            draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                          (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=color)
    elif name == "ring":
        draw.ellipse(box, outline=color, width=max(1, int(r * 0.35)))
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=color)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=color)
    elif name == "crescent":
        draw.ellipse(box, fill=color)
        sx, sy = r * 0.55 * math.cos(rot), r * 0.55 * math.sin(rot)
        bite = Image.new("L", img.size, 0)  # a shifted disc that restores the background: the crescent
        ImageDraw.Draw(bite).ellipse((box[0] + sx, box[1] + sy, box[2] + sx, box[3] + sy), fill=255)
        img.paste(background, (0, 0), bite)
    elif name == "bar":
        dx, dy = math.cos(rot) * r, math.sin(rot) * r
        px, py = -math.sin(rot) * r * 0.22, math.cos(rot) * r * 0.22
        draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                      (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=color)
    return img.resize((size, size), Image.LANCZOS)


def _write_one(job: tuple[Path, str, int, int, int]) -> None:
    out, split, i, size, seed = job
    label = i % len(CLASSES)
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2), i])
    render(label, rng, size).save(out / CLASSES[label] / f"{split}_{i:06d}.png", compress_level=1)


def write_builtin(root: Path, split: str, count: int, size: int, seed: int, pool=None) -> Path:
    """Write ``count`` images as ``root/<split>/<class>/<split>_NNNNNN.png``; classes are balanced.

    ``pool`` (a multiprocessing pool) spreads the rendering; the bytes do not depend on it.
    """
    out = Path(root) / split
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    jobs = [(out, split, i, size, seed) for i in range(count)]
    for _ in (pool.imap_unordered(_write_one, jobs, chunksize=64) if pool else map(_write_one, jobs)):
        pass
    return out
