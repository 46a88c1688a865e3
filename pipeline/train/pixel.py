"""The pixel generator's recipe: MAGE on the (tokens[i, v], reps[i, v]) pairs of the memory-mapped stores, with
MAGE's optimiser (AdamW 0.9/0.95, warm-up + cosine, clipping), optional EMA and word embeddings started from the
tokenizer's code vectors (``pixel.train.codebook_init``), on the shared loop (resumable)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.artifacts import load_model_file
from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.core.rng import seeded_generator
from pipeline.data.alignment import check_tokenizer
from pipeline.data.pixel_data import PixelBatches, PixelData
from pipeline.models.ema import EMA
from pipeline.models.mage import MAGE, masked_token_loss
from pipeline.models.vqgan import MODEL_FORMAT as TOKENIZER_FORMAT
from pipeline.train.identity import resume_identity
from pipeline.train.loop import TrainLoop, param_groups
from pipeline.train.schedules import warmup_cosine

STAGE = "train_pixel"


def tokenizer_codebook(path: Path, tokens_path: Path, tokens_identity: dict) -> torch.Tensor:
    """The code vectors [K, D] of the tokenizer file that made ``tokens.zarr`` (its sha256 must be the one the
    store records): what ``pixel.train.codebook_init`` starts the word embeddings from."""
    if not path.exists():
        raise RcgError(f"pixel.train.codebook_init needs the tokenizer that made the tokens: {path} is missing")
    check_tokenizer(tokens_identity, tokens_path, path)
    state = load_model_file(path, TOKENIZER_FORMAT)["state_dict"]
    return state["quantize.embedding.weight"]


def conditioning_input(data: PixelData, conditioning: str, rows: torch.Tensor,
                       views: torch.Tensor) -> torch.Tensor | None:
    """What the slot is built from: reps[i, v] (rep), labels[i] (class/cluster), nothing (none)."""
    if conditioning == "rep":
        return data.reps_at(rows, views)
    return data.labels[rows] if conditioning in ("class", "cluster") else None


def train(params: Params, data: PixelData, kwargs: dict, conditioning: str, d: Dist,
          device: torch.device) -> tuple[MAGE, EMA | None, dict]:
    """Train (or resume) MAGE on the store pairs with the MAGE recipe; -> (model, EMA or None, loop summary)."""
    t = params.pixel.train
    torch.manual_seed(params.seed)  # identical init on every rank (the loop then seeds dropout per rank and step)
    model = MAGE(**kwargs).to(device)
    if t.codebook_init:
        model.init_from_codebook(tokenizer_codebook(params.paths.model_file("tokenizer"), params.paths.tokens,
                                                    data.identity["tokens"]),
                                 seeded_generator("cpu", params.seed, "pixel.codebook_init"))
    lr = t.blr * t.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)
    ema = EMA(model, max_decay=t.ema_decay) if t.ema_decay is not None else None
    keys = ["seed", "pixel.model", "pixel.train", "pixel.eval.num_images"] + \
        (["pixel.cluster"] if conditioning == "cluster" else [])
    identity = resume_identity(params, keys, conditioning=conditioning, **data.identity)
    loop = TrainLoop.from_section(f"{STAGE}-{conditioning}", params, t, d, device, steps=t.steps, identity=identity,
                                  modules={"model": model}, optimizer=optimizer,
                                  lr=warmup_cosine(lr, t.steps, t.warmup_steps), ema=ema,
                                  ema_model=model if ema else None)
    net = loop.wrap(model)
    batches = PixelBatches(data, t.batch_size, t.accum_steps, params.seed, d)

    def step(micro: tuple, it: int) -> dict:
        rows, views, gen = micro
        c = conditioning_input(data, conditioning, rows, views)
        loss, accuracy = masked_token_loss(model, data.tokens_at(rows, views), c, gen, net=net)
        return {"loss": loss, "accuracy": accuracy}

    def stream():
        for it in range(loop.start, t.steps):
            micro = batches(it)
            yield micro if t.accum_steps > 1 else micro[0]

    if loop.start < t.steps:
        log(f"{STAGE}@{conditioning}: {sum(p.numel() for p in model.parameters()):,} params, lr {lr:.3g}, "
            f"steps {loop.start}..{t.steps}, batch {t.batch_size}, {len(data.train_rows)} images x "
            f"{data.tokens.shape[1]} views of {data.tokens.shape[2]} tokens")
    model.train()
    summary = loop.run(step, stream())
    return model, ema, {"source": "trained", "lr": lr, "world": d.world, **summary}
