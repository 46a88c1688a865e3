"""Decode-and-validate for the shard stage: every file is fully decoded once, then kept or converted.

A file is kept byte-for-byte when it is an upright 8-bit RGB JPEG or PNG without transparency and no resize
is asked for; anything else that decodes (grayscale, CMYK, YCbCr, palette, alpha, 16-bit and 32-bit integer,
float, other formats, an EXIF rotation) becomes the 8-bit RGB picture a viewer shows (:func:`to_rgb8`) and is
re-encoded. Every failure is a reason string for ``rejects.parquet``, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode to grey
Image.MAX_IMAGE_PIXELS = None            # our own max_pixels check runs first, on the header

KEEP_AS_IS = {("JPEG", "RGB"): "jpg", ("PNG", "RGB"): "png"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
EXIF_ORIENTATION = 0x0112


def _reason(prefix: str, exc: Exception) -> str:
    """A stable reject reason (no memory addresses), so rejects.parquet is identical across runs."""
    text = re.sub(r"<[^>]* at 0x[0-9a-f]+>", "data", str(exc))[:120]
    return f"{prefix}: {type(exc).__name__}: {text}"


@dataclass(frozen=True)
class ImagePolicy:
    resize_short_side: int | None = None
    reencode_format: str = "png"
    jpeg_quality: int = 95
    min_side: int = 8
    max_pixels: int = 100_000_000
    max_aspect: float = 20.0


@dataclass(frozen=True)
class Accepted:
    data: bytes
    ext: str
    width: int
    height: int
    sha256: str


def _is_8bit_rgb_png(img: Image.Image) -> bool:
    """PIL opens 16-bit RGB PNGs as mode 'RGB' too; only the raw mode tells them apart."""
    return all(tile[3] == "RGB" for tile in img.tile)


def to_rgb8(img: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a viewer shows for any PIL mode: the EXIF orientation applied; 16-bit (and 32-bit
    integer, read as 16-bit) samples scaled by 255/65535 and float samples read as 0..1, never clipped at 255 (a
    16-bit PNG would turn almost white); transparency (alpha, a palette's or a colour key) composited on white;
    CMYK, YCbCr, 1-bit and palettes through PIL's conversions."""
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        scale = 255 / 65535 if img.mode != "F" else 255.0
        values = np.asarray(img, dtype=np.float64) * scale
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if "transparency" in img.info and img.mode not in ALPHA_MODES:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[..., 3:]
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return img.convert("RGB")


def _needs_conversion(img: Image.Image) -> bool:
    """A JPEG/PNG decoded as RGB that still does not show as stored: a colour key or an EXIF rotation."""
    return "transparency" in img.info or img.getexif().get(EXIF_ORIENTATION, 1) != 1


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on PIL: short side to ``size``, long side truncated, bicubic."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.BICUBIC)


def check_image(data: bytes, policy: ImagePolicy) -> Accepted | str:
    """Validate one file's bytes; return what to store, or why it is rejected."""
    if not data:
        return "empty file (0 bytes)"
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError, ...
        return _reason("not a decodable image", exc)
    w, h = img.size
    if w * h > policy.max_pixels:
        return f"too large: {w}x{h} > max_pixels {policy.max_pixels}"
    if min(w, h) < policy.min_side:
        return f"too small: {w}x{h} < min_side {policy.min_side}"
    if max(w, h) / min(w, h) > policy.max_aspect:
        return f"extreme aspect ratio: {w}x{h} > max_aspect {policy.max_aspect}"
    fmt, mode = img.format, img.mode
    raw_is_rgb8 = fmt != "PNG" or _is_8bit_rgb_png(img)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:
        return _reason("corrupt or truncated image", exc)
    keep_ext = KEEP_AS_IS.get((fmt, mode)) if raw_is_rgb8 and not _needs_conversion(img) else None
    if keep_ext and policy.resize_short_side is None:
        return Accepted(data, keep_ext, w, h, hashlib.sha256(data).hexdigest())
    try:
        rgb = to_rgb8(img)
    except Exception as exc:  # a mode PIL cannot bring to RGB (LAB, HSV, multi-channel TIFF)
        return _reason(f"cannot convert mode {mode} to RGB", exc)
    if policy.resize_short_side is not None:
        rgb = resize_short_side(rgb, policy.resize_short_side)
    out = io.BytesIO()
    if policy.reencode_format == "jpeg":
        rgb.save(out, format="JPEG", quality=policy.jpeg_quality)
        ext = "jpg"
    else:
        rgb.save(out, format="PNG", compress_level=1)
        ext = "png"
    blob = out.getvalue()
    return Accepted(blob, ext, rgb.width, rgb.height, hashlib.sha256(blob).hexdigest())


def decode_rgb(data: bytes) -> Image.Image:
    """Stored shard bytes back to a PIL RGB image (shards only hold RGB JPEG/PNG)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
