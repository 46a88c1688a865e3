"""PNG figures of generated images: sample grids, the paper's Figure 6 and 7 layouts, class rows, reconstructions.

Only layout lives here (uint8 arrays in, PNG out); what goes into a figure is decoded by :mod:`pipeline.gen.rcg`.
Small images (32 px on the default run) are upscaled with nearest neighbour so pixels stay visible in a report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.artifacts import atomic_file
from pipeline.core.errors import RcgError

PAD, GAP, BACKGROUND = 2, 8, 255


def _upscale(images: np.ndarray, cell: int | None) -> np.ndarray:
    """[..., H, W, 3] -> nearest-neighbour upscaled by the integer factor that brings H closest to ``cell``."""
    factor = max(1, round(cell / images.shape[-3])) if cell else 1
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else images


def tile(rows: np.ndarray, cell: int | None = None, gaps: tuple[int, ...] = ()) -> np.ndarray:
    """uint8 images [R, C, H, W, 3] -> one uint8 picture, rows of C cells on a white background; a wider gap
    after each column in ``gaps`` sets apart what a row is made from (the real images of Figures 6 and 7)."""
    if rows.ndim != 5 or rows.shape[-1] != 3 or rows.dtype != np.uint8:
        raise RcgError(f"figure: expected uint8 images [R, C, H, W, 3], got {rows.dtype} {list(rows.shape)}")
    rows = _upscale(rows, cell)
    r, c, h, w, _ = rows.shape
    xs = [PAD + j * (w + PAD) + GAP * sum(j > g for g in gaps) for j in range(c)]
    out = np.full((PAD + r * (h + PAD), xs[-1] + w + PAD, 3), BACKGROUND, dtype=np.uint8)
    for i in range(r):
        for j in range(c):
            y = PAD + i * (h + PAD)
            out[y:y + h, xs[j]:xs[j] + w] = rows[i, j]
    return out


def grid(images: np.ndarray, columns: int, cell: int | None = None) -> np.ndarray:
    """uint8 images [N, H, W, 3] in rows of ``columns`` (the last row padded with background)."""
    n = len(images)
    if n == 0:
        raise RcgError("figure: no images to lay out")
    rows = -(-n // columns)
    padded = np.full((rows * columns, *images.shape[1:]), BACKGROUND, dtype=np.uint8)
    padded[:n] = images
    return tile(padded.reshape(rows, columns, *images.shape[1:]), cell)


def beside(first: np.ndarray, rows: np.ndarray, cell: int | None = None, last: np.ndarray | None = None) -> np.ndarray:
    """Figure 6 layout: real image i [R, H, W, 3], then what was made from it [R, C, H, W, 3], one row each;
    with ``last`` (Figure 7) a second real image closes each row."""
    if len(first) != len(rows) or (last is not None and len(last) != len(rows)):
        raise RcgError(f"figure: {len(first)} leading images for {len(rows)} rows")
    parts = [first[:, None], rows] + ([last[:, None]] if last is not None else [])
    gaps = (0,) if last is None else (0, rows.shape[1])
    return tile(np.concatenate(parts, axis=1), cell, gaps)


def interleave(originals: np.ndarray, others: np.ndarray, columns: int, cell: int | None = None) -> np.ndarray:
    """Reconstructions beside their originals: [N, H, W, 3] each -> columns of (original, reconstruction) pairs."""
    if originals.shape != others.shape:
        raise RcgError(f"figure: {list(originals.shape)} originals vs {list(others.shape)} reconstructions")
    pairs = np.stack([originals, others], axis=1).reshape(-1, *originals.shape[1:])
    return grid(pairs, 2 * columns, cell)


def save_png(path: str | Path, picture: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] picture atomically as PNG."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(picture, "RGB").save(tmp, format="PNG")
    return path

