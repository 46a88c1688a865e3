"""How well an RDM models its representation store: the Fréchet distance of its samples to the store, next to
what a perfect model of the store scores (its lower bound), a Gaussian fit, and k-NN precision/recall."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline.core.config import Rdm
from pipeline.core.errors import RcgError
from pipeline.core.progress import progress
from pipeline.data.rep_store import RepStore
from pipeline.eval.metrics import frechet_distance, gaussian_stats, knn_precision_recall
from pipeline.eval.probes import knn_accuracy
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.samplers.diffusion import sample_reps
from pipeline.models.rdm import RDM
from pipeline.models.ema import EMA
from pipeline.core.rng import seeded_generator


def gaussian_draws(stats: tuple[np.ndarray, np.ndarray], m: int, draws: int, gen: torch.Generator,
                   device: torch.device) -> list[torch.Tensor]:
    """``draws`` x M samples of N(mean, cov): what a model that knows only the store's first two moments makes."""
    lam, vecs = np.linalg.eigh(stats[1])
    factor = torch.from_numpy(vecs * np.sqrt(lam.clip(min=0))).float().to(device)
    mean = torch.from_numpy(stats[0]).float().to(device)
    return [mean + torch.randn(m, len(lam), generator=gen, device=device) @ factor.T for _ in range(draws)]


def draw_reps(store: RepStore, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """M (image, view) pairs drawn i.i.d. with replacement: (reps [M, D], rows [M])."""
    n, v, _ = store.shape
    rows = torch.randint(n, (m,), generator=gen, device=store.device)
    return store.gather(rows, torch.randint(v, (m,), generator=gen, device=store.device)), rows


def _fd(draw: torch.Tensor, ref: tuple[np.ndarray, np.ndarray]) -> float:
    return frechet_distance(*gaussian_stats(draw.cpu().numpy()), *ref)


@torch.no_grad()
def evaluate(rdm: Rdm, seed: int, model: RDM, ema: EMA | None, store: RepStore, ref: tuple[np.ndarray, np.ndarray],
             device: torch.device) -> dict:
    """Fréchet distance of M generated reps to the whole store (``ref``: its mean and covariance), next to the
    lower bound: the FD of M reps drawn i.i.d. from the store itself, i.e. what a perfect model of the store
    scores (the paper's 0.48 generated vs 0.38 real on ImageNet). FD sees only mean and covariance, so the FD
    of a plain Gaussian fit and the k-NN precision/recall (which see the shape of the distribution) are
    reported beside it. ``rdm``: the params section; ``seed``: the run's seed. Returns flat numbers and short
    names (metrics/rdm.json); docs/metrics.md states what each one is.

    The real draws are with replacement, as a generator's samples are independent: M distinct images out of N
    would be a finite-population sample whose FD shrinks as M approaches N (at M = N/2 by ~40%), a bound no
    sampler can reach.
    """
    ev = rdm.eval
    n, v, _ = store.shape
    m = ev.num_samples
    if m <= ev.prc_k:
        raise RcgError(f"rdm.eval.num_samples ({m}) must exceed rdm.eval.prc_k ({ev.prc_k})")
    gen = seeded_generator(device, seed, "rdm.eval")
    real, rows = draw_reps(store, m, gen)  # its labels are what the generated reps are conditioned on
    bank = None
    if rdm.model.class_cond:  # k-NN bank: view 0 of the images not drawn; checked before the costly sampling
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[rows] = False
        if keep.sum() < ev.knn_k:
            raise RcgError(f"rdm.eval.num_samples ({m}) leaves fewer than rdm.eval.knn_k ({ev.knn_k}) of the "
                           f"store's {n} images undrawn for the k-NN class-agreement bank; lower it")
        bank = (store.reps[keep.cpu(), 0].to(device), store.labels[keep])
    labels = store.labels[rows] if rdm.model.class_cond else torch.zeros_like(rows)

    diffusion = GaussianDiffusion(**rdm.diffusion.model_dump()).to(device)
    model.eval()
    samples = []
    scope = ema.swapped_in(model.net) if ema is not None else contextlib.nullcontext()
    bar = progress(total=m, desc="rdm samples", unit="rep")
    with scope:
        for i in range(0, m, ev.batch_size):
            y = labels[i:i + ev.batch_size]
            samples.append(sample_reps(model, diffusion, y, steps=rdm.sample.steps, eta=rdm.sample.eta,
                                       temperature=rdm.sample.temperature, generator=gen))
            bar.update(len(y))
    bar.close()
    fake = torch.cat(samples)
    if not torch.isfinite(fake).all():
        raise RcgError("rdm samples hold NaN/Inf: the model file is broken (check the training curve)")

    fd_gen = _fd(fake, ref)
    lows = [_fd(draw, ref) for draw in [real] + [draw_reps(store, m, gen)[0] for _ in range(ev.lower_bound_draws - 1)]]
    fd_low = float(np.mean(lows))
    gaussians = gaussian_draws(ref, m, ev.lower_bound_draws, gen, device)
    gaussian = [_fd(draw, ref) for draw in gaussians]
    others, _ = draw_reps(store, m, gen)  # P/R reference: a third, independent draw
    precision, recall = knn_precision_recall(others, fake, k=ev.prc_k)
    precision_real, recall_real = knn_precision_recall(others, real, k=ev.prc_k)
    precision_gaussian, recall_gaussian = knn_precision_recall(others, gaussians[0], k=ev.prc_k)
    out = {"fd_generated": fd_gen, "fd_lower_bound": fd_low, "fd_lower_bound_std": float(np.std(lows)),
           "ratio": fd_gen / fd_low, "fd_gaussian_fit": float(np.mean(gaussian)),
           "precision": precision, "recall": recall, "precision_real": precision_real, "recall_real": recall_real,
           "precision_gaussian_fit": precision_gaussian, "recall_gaussian_fit": recall_gaussian,
           "num_samples": m, "prc_k": ev.prc_k, "lower_bound_draws": len(lows), "store_images": n,
           "store_views": v, "weights": "ema" if ema is not None else "raw", "sample_steps": rdm.sample.steps,
           "sample_eta": rdm.sample.eta, "sample_temperature": rdm.sample.temperature,
           "generated_std": fake.std(dim=1).mean().item()}
    if bank is not None:  # queries: the samples / the real draws, each with its requested (true) class
        bank, bank_labels = bank
        out["class_agreement"] = knn_accuracy(bank, bank_labels, k=ev.knn_k, queries=fake, query_labels=labels)
        out["class_agreement_real"] = knn_accuracy(bank, bank_labels, k=ev.knn_k, queries=real, query_labels=labels)
        out["knn_k"] = ev.knn_k
        out["classes_requested"] = int(labels.unique().numel())
    return out
