"""Editing, inpainting and outpainting with a rep-conditioned pixel generator (``rcg edit``).

The image is tokenized, the tokens overlapping the box (plus a ring of one token, so the new content blends
into what is kept) are masked, and the masked-token decoder's infill mode regenerates only those, conditioned
on a representation: the image's own, another image's, or an RDM sample. Every other token is kept as it was.

Coordinates: the generator makes S x S images (S = token grid x the tokenizer's factor), so an image of
another size is first brought to S x S as view 0 is (resize the short side, centre crop); the box
``(x0, y0, x1, y1)`` (x1, y1 exclusive) is in that picture's pixels. A box reaching past the border is
outpainting: the S x S window is shifted (by whole tokens) to contain the box, what lies outside the image is
a zero-padded canvas, and every token that is not wholly image is generated too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.core.errors import RcgError
from pipeline.data.images import resize_short_side
from pipeline.gen.masked_decoding import decode_tokens
from pipeline.gen.rcg import Models, to_uint8


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image -> uint8 [size, size, 3]: short side resized to ``size``, centre crop (as view 0)."""
    img = resize_short_side(image.convert("RGB"), size)
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


@dataclass
class Canvas:
    pixels: np.ndarray   # uint8 [S, S, 3]: the image where it is, zeros elsewhere
    mask: np.ndarray     # bool [h, w]: tokens to generate
    offset: tuple[int, int]  # (x, y) of the canvas' top-left corner in the image's pixels


def make_canvas(image: np.ndarray, box: tuple[int, int, int, int], factor: int) -> Canvas:
    """Place the S x S image on the S x S window that contains ``box`` and mark the tokens to generate: those
    overlapping the box or not wholly inside the image, grown by a ring of one token."""
    size = image.shape[0]
    x0, y0, x1, y1 = box
    if x0 >= x1 or y0 >= y1:
        raise RcgError(f"--box {x0},{y0},{x1},{y1}: needs x0 < x1 and y0 < y1")
    if x1 <= 0 or y1 <= 0 or x0 >= size or y0 >= size:
        raise RcgError(f"--box {x0},{y0},{x1},{y1} lies outside the {size}x{size} image")
    if x1 - x0 > size or y1 - y0 > size:
        raise RcgError(f"--box {x0},{y0},{x1},{y1} is larger than the {size}x{size} images the generator makes")

    def shift(lo: int, hi: int) -> int:  # whole tokens, so kept tokens see the same pixels as in the image
        if lo < 0:
            return -((-lo + factor - 1) // factor) * factor
        if hi > size:
            return ((hi - size + factor - 1) // factor) * factor
        return 0

    ox, oy = shift(x0, x1), shift(y0, y1)
    pixels = np.zeros_like(image)
    src = image[max(oy, 0):size + min(oy, 0), max(ox, 0):size + min(ox, 0)]
    pixels[max(-oy, 0):max(-oy, 0) + src.shape[0], max(-ox, 0):max(-ox, 0) + src.shape[1]] = src
    inside = np.zeros((size, size), dtype=bool)
    inside[max(-oy, 0):max(-oy, 0) + src.shape[0], max(-ox, 0):max(-ox, 0) + src.shape[1]] = True
    grid = size // factor
    covered = np.zeros((size, size), dtype=bool)
    covered[max(y0 - oy, 0):max(y1 - oy, 0), max(x0 - ox, 0):max(x1 - ox, 0)] = True
    cells = lambda a: a.reshape(grid, factor, grid, factor)
    mask = cells(covered).any(axis=(1, 3)) | ~cells(inside).all(axis=(1, 3))
    ring = mask.copy()  # grow by one token in all eight directions
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ring[max(dy, 0):grid + min(dy, 0), max(dx, 0):grid + min(dx, 0)] |= \
                mask[max(-dy, 0):grid + min(-dy, 0), max(-dx, 0):grid + min(-dx, 0)]
    return Canvas(pixels, ring, (ox, oy))


def shown_masked(canvas: Canvas) -> np.ndarray:
    """The canvas with the tokens to generate painted grey: what the decoder is given, as a picture."""
    factor = canvas.pixels.shape[0] // canvas.mask.shape[0]
    out = canvas.pixels.copy()
    out[canvas.mask.repeat(factor, 0).repeat(factor, 1)] = 128
    return out


@dataclass
class Edited:
    image: np.ndarray      # uint8 [S, S, 3]
    tokens: torch.Tensor   # [h, w] after editing
    original: torch.Tensor  # [h, w] of the canvas before
    canvas: Canvas


@torch.inference_mode()
def edit(models: Models, image: np.ndarray, box: tuple[int, int, int, int], rep: torch.Tensor, iterations: int,
         temperature: float, guidance: float, generator: torch.Generator, composite: bool = True) -> Edited:
    """Regenerate the box of a uint8 [S, S, 3] image conditioned on ``rep`` [D]; unmasked tokens are kept. With
    ``composite`` the pixels outside the generated tokens are the input's own (not their VQGAN reconstruction),
    so an edit changes nothing outside the box and its ring."""
    px = models.pixel
    if px.conditioning != "rep":
        raise RcgError(f"editing needs the rep-conditioned pixel generator, the file is {px.conditioning!r}")
    if rep.numel() != px.rep_dim:
        raise RcgError(f"the representation is {rep.numel()}-d but the pixel generator takes {px.rep_dim}-d ones")
    size = models.image_size
    if image.shape[:2] != size:
        raise RcgError(f"edit: expected a {size[0]}x{size[1]} image, got {image.shape[1]}x{image.shape[0]}")
    canvas = make_canvas(image, box, models.tokenizer.downsample_factor)
    device = models.device
    x = torch.from_numpy(canvas.pixels).to(device).permute(2, 0, 1)[None].float().div(255)
    original = models.tokenizer.encode_to_indices(x)[0]
    mask = torch.from_numpy(canvas.mask).to(device)
    steps = min(iterations, int(mask.sum()))
    given = original.reshape(1, -1).masked_fill(mask.reshape(1, -1), px.model.mask_id)
    tokens = decode_tokens(px.model, px.model.condition(rep.to(device, torch.float32)[None]), generator,
                           num_iter=steps, choice_temperature=temperature, guidance=guidance, tokens=given)
    tokens = tokens.view(*px.grid)
    out = to_uint8(models.tokenizer.decode_indices(tokens[None].long()))[0]
    if composite:
        factor = models.tokenizer.downsample_factor
        out = np.where(canvas.mask.repeat(factor, 0).repeat(factor, 1)[..., None], out, canvas.pixels)
    return Edited(out, tokens, original, canvas)
