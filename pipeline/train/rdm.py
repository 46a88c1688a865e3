"""Training the Representation Diffusion Model on an in-memory rep store, on the shared loop (docs/official.md §2).

Official recipe: AdamW (wd 0.01), lr = blr x global batch, constant (optionally warm-up + cosine), EMA with
LitEma's warm-up updated inside the forward, i.e. before the optimizer step (it lags one step), x0 loss
(optionally Min-SNR weighted) on the reps in the RDM's (optionally whitened) space.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch

from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.progress import log
from pipeline.data.rep_store import RepBatches, RepStore
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.losses.diffusion import x0_loss
from pipeline.models.rdm import RDM, rdm_kwargs
from pipeline.models.ema import EMA
from pipeline.train.identity import resume_identity
from pipeline.train.loop import TrainLoop
from pipeline.train.schedules import warmup_constant, warmup_cosine

STAGE = "train_rdm"


def train_rdm(params: Params, store: RepStore, stats: tuple[np.ndarray, np.ndarray], device: torch.device,
              d: Dist) -> tuple[RDM, EMA, dict, dict]:
    """Train (or resume) the RDM on ``store`` (``stats``: its mean and covariance, which fit the whitening);
    returns the bare model, its EMA, its RDM kwargs and the loop's summary (+ source, lr, world)."""
    cfg, t = params.rdm, params.rdm.train
    if t.batch_size % d.world:
        raise RcgError(f"rdm.train.batch_size ({t.batch_size}) must be divisible by the {d.world} ranks")
    torch.manual_seed(params.seed)  # identical init on every rank (the loop then seeds dropout per rank and step)
    kwargs = rdm_kwargs(cfg.model)
    model = RDM(**kwargs)
    model.whitening.fit(*(torch.from_numpy(a) for a in stats), cfg.model.whiten_power, cfg.model.whiten_eps)
    model.to(device)
    if not cfg.model.class_cond:  # the single "fake class" row is never read (official): no grad, no decay
        model.cond_stage_model.requires_grad_(False)
    ema = EMA(model.net, max_decay=t.ema_decay)  # LitEma covers the MLP, not the class embedder
    diffusion = GaussianDiffusion(**cfg.diffusion.model_dump()).to(device)
    lr = t.blr * t.batch_size
    # fused: one kernel on GPU, and ~4x faster than the default per-tensor loop on CPU
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=t.weight_decay, fused=True)
    identity = resume_identity(params, ["seed", "rdm.model", "rdm.diffusion", "rdm.train"],
                               store=store.identity, store_shape=list(store.shape))
    schedule = warmup_cosine(lr, t.steps, t.warmup_steps) if t.cosine else warmup_constant(lr, t.warmup_steps)
    loop = TrainLoop.from_section(STAGE, params, t, d, device, steps=t.steps, identity=identity,
                                  modules={"model": model, "ema": ema}, optimizer=optimizer, lr=schedule)
    net = loop.wrap(model)
    rep_batches = RepBatches(store, t.batch_size // d.world, params.seed, d)
    if loop.start < t.steps:
        log(f"train_rdm: {sum(p.numel() for p in model.parameters()):,} params, lr {lr:.3g}, "
            f"steps {loop.start}..{t.steps}, batch {t.batch_size} over {d.world} rank(s), store {list(store.shape)}")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Generator]]:
        """(x0 in the RDM's space, labels, the iteration's noise generator), outside autocast."""
        for it in itertools.count(loop.start):
            x0, rows, gen = rep_batches(it)
            y = store.labels[rows] if cfg.model.class_cond else torch.zeros_like(rows)  # uncond: label 0 (official)
            yield model.whitening.encode(x0), y, gen

    def step(batch: tuple[torch.Tensor, torch.Tensor, torch.Generator], it: int) -> dict:
        x0, y, gen = batch
        ema.update(model.net)  # LitEma updates inside the forward, before the optimizer step: it lags one step
        return {"loss": x0_loss(diffusion, net, x0, y, generator=gen, min_snr_gamma=t.min_snr_gamma)}

    summary = loop.run(step, batches())
    return model, ema, kwargs, {"source": "trained", **summary, "lr": lr, "world": d.world}
