"""``rcg edit IMAGE --box x0,y0,x1,y1 [--rep-from OTHER | --rep-from-rdm] --out FILE``: regenerate a box of an
image with the rep-conditioned pixel generator (inpainting; outpainting when the box reaches past the border),
conditioned on the image's own representation, another image's, or an RDM sample. Not a DVC stage: it reads
the model files (the project's by default, any given by path) and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from pipeline.core.artifacts import is_model_file, load_checkpoint, load_model, weights_sha256
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.core.runtime import device_for
from pipeline.gen import figures as fig
from pipeline.gen.editing import edit, fit_image
from pipeline.gen.rcg import load_models
from pipeline.models.encoder import Encoder, image_rep
from pipeline.models.official.encoder import load_encoder
from pipeline.samplers.diffusion import sample_reps
from pipeline.core.rng import seeded_generator


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise RcgError(f"--box expects four integers x0,y0,x1,y1, got {text!r}")
    return box


def read_image(path: Path, flag: str) -> Image.Image:
    if not Path(path).is_file():
        raise RcgError(f"{flag}: file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise RcgError(f"{flag}: {path} is not a readable image ({exc})") from None
    return img


def load_any_encoder(path: Path) -> Encoder:
    """An "rcg-encoder" model file or an official MoCo v3 checkpoint."""
    ckpt = load_checkpoint(path)
    return load_model("encoder", path)[0] if is_model_file(ckpt) else load_encoder(path)


def run(params: Params, image: Path, box: str, out: Path, rep_from: Path | None = None, rep_from_rdm: bool = False,
        pixel: Path | None = None, tokenizer: Path | None = None, encoder: Path | None = None,
        rdm: Path | None = None, iterations: int = 20, temperature: float = 6.0, guidance: float = 0.0,
        seed: int = 0, composite: bool = True) -> dict:
    if rep_from is not None and rep_from_rdm:
        raise RcgError("give --rep-from OTHER or --rep-from-rdm, not both")
    paths = params.paths
    pixel, tokenizer = pixel or paths.model_file("pixel", "rep"), tokenizer or paths.model_file("tokenizer")
    encoder, rdm = encoder or paths.model_file("encoder"), rdm or paths.model_file("rdm")
    needed = [(pixel, "--pixel"), (tokenizer, "--tokenizer")] + ([(rdm, "--rdm")] if rep_from_rdm else [(encoder, "--encoder")])
    for path, flag in needed:
        if not Path(path).is_file():
            raise RcgError(f"{flag}: no model at {path}")
    for flag, value, low in (("--iterations", iterations, 1), ("--temperature", temperature, 0),
                             ("--guidance", guidance, 0)):
        if value < low:
            raise RcgError(f"{flag} must be >= {low}, got {value}")
    box_xy = parse_box(box)
    device = device_for(params.runtime)
    models = load_models(pixel, tokenizer, rdm if rep_from_rdm else None, device)
    size = models.image_size[0]
    picture = fit_image(read_image(image, "IMAGE"), size)
    tokens = models.pixel.grid[0] * models.pixel.grid[1]
    if iterations > tokens:
        raise RcgError(f"--iterations ({iterations}) exceeds the {tokens} tokens of the generator's grid")
    gen = seeded_generator(device, seed)
    if rep_from_rdm:
        if models.rdm.model.class_cond:
            raise RcgError("--rep-from-rdm needs an unconditional RDM")
        rep = sample_reps(models.rdm.model, models.rdm.diffusion, torch.zeros(1, dtype=torch.long, device=device),
                          steps=params.sample.rdm.steps, eta=params.sample.rdm.eta,
                          temperature=params.sample.rdm.temperature, generator=gen)[0]
        source = "rdm"
    else:
        enc = load_any_encoder(Path(encoder)).to(device)
        if models.pixel.encoder and weights_sha256(enc.state_dict()) != models.pixel.encoder:
            raise RcgError(f"--encoder {encoder}: the pixel generator was trained on another encoder's reps")
        other = picture if rep_from is None else fit_image(read_image(rep_from, "--rep-from"), size)
        rep = image_rep(enc, other, device)
        source = "own" if rep_from is None else "other"
    result = edit(models, picture, box_xy, rep, iterations, temperature, guidance, gen, composite)
    fig.save_png(out, result.image)
    return {"output": str(out), "size": size, "rep": source, "offset": list(result.canvas.offset),
            "tokens_generated": int(result.canvas.mask.sum()), "tokens": tokens}
