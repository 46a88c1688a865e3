"""Stage ``train_rdm``: the Representation Diffusion Model, trained on the cached ``reps.zarr`` and evaluated.

The official recipe runs the frozen encoder on a fresh random crop of every image at every step; here every
view was encoded once, so a training step is an index into an in-memory [N, V, D] tensor (a random image,
a random one of its V views) and the step costs what the MLP costs. The reps are mapped into the RDM's
(optionally whitened) space on the way in, and samples back on the way out. With ``rdm.checkpoint`` set, an
official RDM is imported instead of trained, and evaluated the same way.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model_file, weights_sha256, write_json
from pipeline.core.config import Diffusion, Params
from pipeline.gen.diffusion import GaussianDiffusion
from pipeline.train.ema import EMA
from pipeline.models.encoder import import_mocov3_state_dict, infer_vit_config
from pipeline.core.errors import RcgError
from pipeline.eval.metrics import frechet_distance, gaussian_stats, knn_accuracy, knn_precision_recall
from pipeline.core.progress import log, progress
from pipeline.models.rdm import RDM, load_official_rdm, official_rdm_encoder, rdm_kwargs, read_official_rdm, sample_reps
from pipeline.core.runtime import device_for
from pipeline.data.stores import open_store
from pipeline.train.state import CurveLog, TrainState, check_finite, cosine_lr, set_lr

FORMAT = "rcg-rdm"
STAGE = "train_rdm"


# ------------------------------------------------------------------------------------------------ data
@dataclass
class RepStore:
    """The whole representation store on the training device: reps [N, V, D] float32, labels [N]."""
    path: Path
    reps: torch.Tensor
    labels: torch.Tensor
    identity: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.reps.shape)


def load_store(params: Params, device: torch.device) -> RepStore:
    """Read reps.zarr chunk by chunk into memory (ImageNet at V=4 is ~5 GB), refusing NaN/Inf rows and a
    representation size or label set the RDM config cannot take."""
    path = params.paths.reps
    group = open_store(path, "reps")
    arr = group["reps"]
    if arr.ndim != 3:
        raise RcgError(f"{path}: 'reps' has shape {arr.shape}, expected [N, V, D]")
    n, v, dim = arr.shape
    m = params.rdm.model
    if dim != m.in_channels:
        raise RcgError(f"{path} holds {dim}-d representations but rdm.model.in_channels is {m.in_channels}")
    reps = np.empty((n, v, dim), dtype=np.float32)
    step = arr.chunks[0]
    for start in range(0, n, step):
        block = np.asarray(arr[start:start + step], dtype=np.float32)
        bad = ~np.isfinite(block).all(axis=2)
        if bad.any():
            row, view = (int(i) for i in np.argwhere(bad)[0])
            raise RcgError(f"{path}: row {start + row} (view {view}) holds NaN or Inf; "
                           "rerun encode (delete the store) or check the encoder")
        reps[start:start + step] = block
    labels = np.asarray(group["labels"][:], dtype=np.int64)
    if m.class_cond:
        if (labels < 0).any():
            raise RcgError(f"{path}: rdm.model.class_cond needs labels, but row {int(np.argmax(labels < 0))} "
                           "has none (-1): the images came without class folders")
        if labels.max() >= m.num_classes:
            raise RcgError(f"{path}: label {int(labels.max())} does not fit rdm.model.num_classes "
                           f"({m.num_classes})")
    identity = group.attrs.asdict().get("identity", {})
    return RepStore(path, torch.from_numpy(reps).to(device), torch.from_numpy(labels).to(device), identity)


def seeded(device: torch.device, *entropy: int) -> torch.Generator:
    """A generator seeded from a tuple (seed, purpose, ...): independent streams without saved RNG state."""
    seed = np.random.SeedSequence([e % 2**63 for e in entropy]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed) & (2**63 - 1))


class RepBatches:
    """Batch ``step`` of rank ``rank`` as a pure function of (seed, step, rank), so a resumed run draws
    exactly what the killed one would have.

    Every epoch the images go through a fresh seeded permutation split across ranks (DistributedSampler
    with drop_last, as the official loader); each image then gets a uniformly random one of its V views,
    the stand-in for the official random crop + flip.
    """

    def __init__(self, store: RepStore, batch: int, seed: int, d: distributed.Dist):
        self.store, self.batch, self.seed, self.d = store, batch, seed, d
        n = store.shape[0]
        self.per_epoch = n // (batch * d.world)
        if self.per_epoch == 0:
            raise RcgError(f"rdm.train.batch_size ({batch}) x {d.world} ranks exceeds the store's {n} images")
        self.epoch, self.perm = -1, None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """(x0 [B, D], row indices [B], the step's generator for the diffusion noise)."""
        epoch, i = divmod(step, self.per_epoch)
        device = self.store.reps.device
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.store.shape[0], generator=seeded(device, self.seed, 1, epoch),
                                       device=device)
        start = (i * self.d.world + self.d.rank) * self.batch
        rows = self.perm[start:start + self.batch]
        gen = seeded(device, self.seed, 2, step, self.d.rank)
        views = torch.randint(self.store.shape[1], (self.batch,), generator=gen, device=device)
        return self.store.reps[rows, views], rows, gen


# -------------------------------------------------------------------------------------------- training
def train_config(params: Params, store: RepStore, world: int) -> dict:
    """What the training result depends on: a resume state written under anything else is not reused.

    The whitening and Min-SNR keys count only when switched on, so a state saved by an official-formulation run
    before they existed still resumes."""
    rdm = params.section("rdm")
    model = dict(rdm["model"])
    if not model["whiten_power"]:
        del model["whiten_power"], model["whiten_eps"]
    train = {k: v for k, v in rdm["train"].items() if k not in ("checkpoint_every", "log_every")}
    if train["min_snr_gamma"] is None:
        del train["min_snr_gamma"]
    return {"seed": params.seed, "model": model, "diffusion": rdm["diffusion"], "train": train,
            "store": store.identity, "store_shape": list(store.shape), "world": world}


def train(params: Params, store: RepStore, stats: tuple[np.ndarray, np.ndarray], device: torch.device,
          d: distributed.Dist) -> tuple[RDM, EMA, dict, dict]:
    """Train (or resume) the RDM on the store (``stats``: its mean and covariance, which fit the whitening);
    returns the bare model, its EMA, its RDM kwargs and a summary."""
    cfg, t = params.rdm, params.rdm.train
    torch.manual_seed(params.seed)  # identical init on every rank
    kwargs = rdm_kwargs(cfg.model)
    model = RDM(**kwargs)
    model.whitening.fit(*(torch.from_numpy(a) for a in stats), cfg.model.whiten_power, cfg.model.whiten_eps)
    model.to(device)
    if not cfg.model.class_cond:  # the single "fake class" row is never read (official): no grad, no decay
        model.cond_stage_model.requires_grad_(False)
    ema = EMA(model.net, max_decay=t.ema_decay)  # LitEma covers the MLP, not the class embedder
    diffusion = GaussianDiffusion(**cfg.diffusion.model_dump()).to(device)
    lr = t.blr * t.batch_size * d.world
    # fused: one kernel on GPU, and ~4x faster than the default per-tensor loop on CPU
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=t.weight_decay, fused=True)
    state = TrainState(params.paths.state / f"{STAGE}.pt", train_config(params, store, d.world))
    modules = {"model": model, "ema": ema, "optimizer": optimizer}
    start, _ = state.load(modules)
    curves = CurveLog(params.paths.plots / f"{STAGE}.csv", ["loss", "lr"], resume_step=start) if d.is_main else None
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if d.world > 1 else model
    if params.runtime.compile and device.type == "cuda":
        net = torch.compile(net)
    batches = RepBatches(store, t.batch_size, params.seed, d)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if t.bf16 and device.type == "cuda"
           else contextlib.nullcontext())
    if start < t.steps:
        log(f"train_rdm: {sum(p.numel() for p in model.parameters()):,} params, lr {lr:.3g}, "
            f"steps {start}..{t.steps}, batch {t.batch_size} x {d.world}, store {list(store.shape)}")

    pending: list[torch.Tensor] = []  # losses since the last check: one host sync per interval, not per step
    bar = progress(total=t.steps, desc="train_rdm", unit="step")
    bar.update(start)
    tic = time.perf_counter()
    for step in range(start + 1, t.steps + 1):  # numbered from 1, like the curves and the saved state
        it = step - 1  # iterations done before this step, as MAE-style schedules count
        cur_lr = (cosine_lr(it, t.steps, lr, t.warmup_steps) if t.cosine
                  else lr * min(1.0, it / t.warmup_steps) if t.warmup_steps else lr)
        set_lr(optimizer, cur_lr)
        x0, rows, gen = batches(it)
        x0 = model.whitening.encode(x0)
        y = store.labels[rows] if cfg.model.class_cond else torch.zeros_like(rows)  # uncond: label 0 (official)
        ema.update(model.net)  # LitEma updates inside the forward, before the optimizer step: it lags one step
        with amp:
            loss = diffusion.training_loss(net, x0, y, generator=gen, min_snr_gamma=t.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pending.append(loss.detach())
        bar.update(1)
        if step % t.log_every and step % t.checkpoint_every and step != t.steps:
            continue
        losses, pending = torch.stack(pending), []
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):  # named by the first bad step; the state on disk predates it
            check_finite(losses[bad[0]], step - len(losses) + 1 + int(bad[0]), STAGE, state)
        mean_loss = distributed.all_mean(losses.mean().item(), d, device)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if curves is not None:
            curves.add(step, loss=mean_loss, lr=cur_lr)
        if d.is_main and (step % t.checkpoint_every == 0 or step == t.steps):
            state.save(step, modules)
    bar.close()
    seconds = time.perf_counter() - tic
    trained = t.steps - start
    summary = {"source": "trained", "steps": t.steps, "resumed_from": start, "lr": lr, "world": d.world,
               "train_seconds": round(seconds, 2),
               "samples_per_s": round(trained * t.batch_size * d.world / seconds, 1) if trained else None}
    return model, ema, kwargs, summary


# ---------------------------------------------------------------------------------------- official file
def check_encoder(embedded: dict, store: RepStore, path: Path) -> str:
    """Refuse an official RDM trained on another encoder than the one the store's reps came from.

    The file carries the MoCo v3 weights it was trained with (``pretrained_encoder.*``); the store records
    its encoder's config (and, when the encode stage wrote it, ``weights_sha256``). Only reps.zarr is read,
    so the check needs no dependency beyond the stage's declared ones. Returns what was compared.
    """
    if not embedded:
        raise RcgError(f"{path} carries no pretrained_encoder.* weights: nothing shows which encoder it was "
                       "trained with")
    enc = store.identity.get("encoder") or {}
    have = (enc.get("config") or {}).get("model")
    if not isinstance(have, dict):
        raise RcgError(f"{store.path} does not record its encoder's config (identity.encoder.config.model)")
    try:
        trained = infer_vit_config(embedded, have.get("num_heads"))
    except RcgError as exc:
        raise RcgError(f"{path}: pretrained_encoder.*: {exc}") from None
    diffs = [f"{k} {trained[k]} (store's encoder: {have[k]})" for k in trained if k in have and trained[k] != have[k]]
    if diffs:
        raise RcgError(f"this RDM was trained with another encoder than the one {store.path} was encoded with: "
                       + ", ".join(diffs))
    if "weights_sha256" not in enc:
        log(f"warning: {store.path} records no encoder weights hash; checked the encoder architecture only")
        return "architecture"
    if weights_sha256(import_mocov3_state_dict(embedded)) != enc["weights_sha256"]:
        raise RcgError(f"this RDM was trained with another encoder than the one {store.path} was encoded with "
                       "(same architecture, different weights)")
    return "weights"


def import_official(params: Params, store: RepStore, device: torch.device) -> tuple[RDM, EMA | None, dict, dict]:
    """An official RCG RDM checkpoint as our model, after checking it fits rdm.model and the store."""
    path = params.rdm.checkpoint
    sd = read_official_rdm(path)
    config, net_sd, ema_sd, cond_sd = load_official_rdm(path, sd)
    ours = rdm_kwargs(params.rdm.model)
    diffs = [f"{k} {ours[k]} (file: {config[k]})" for k in config if ours[k] != config[k]]
    if params.rdm.model.whiten_power:
        diffs.append(f"whiten_power {params.rdm.model.whiten_power} (official RDMs run on the raw reps: 0)")
    if diffs:
        raise RcgError(f"rdm.checkpoint {path} does not match rdm.model: {', '.join(diffs)}")
    if params.rdm.diffusion != Diffusion():  # load_official_rdm checked the file's betas against this schedule
        raise RcgError(f"rdm.checkpoint {path} uses the official schedule (T=1000, 0.0015..0.0195); "
                       "rdm.diffusion must keep its defaults")
    encoder_check = check_encoder(official_rdm_encoder(sd), store, path)
    model = RDM(**config)
    model.net.load_state_dict(net_sd)
    model.cond_stage_model.load_state_dict(cond_sd)
    model.to(device)
    ema = None
    if ema_sd is not None:
        ema = EMA(model.net, max_decay=params.rdm.train.ema_decay)
        ema.load_state_dict(ema_sd)
    else:
        log(f"warning: {path} has no EMA weights; evaluating its raw weights")
    return model, ema, config, {"source": "official", "checkpoint": str(path), "sha256": file_sha256(path),
                                "encoder_check": encoder_check}


# ------------------------------------------------------------------------------------------ evaluation
def store_stats(reps: torch.Tensor, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance over all N x V reps, accumulated in float64 block by block."""
    flat = reps.reshape(-1, reps.shape[-1])
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
    outer = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    for i in range(0, len(flat), block):
        x = flat[i:i + block].double()
        total += x.sum(0)
        outer += x.T @ x
    n = len(flat)
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


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
    rows = torch.randint(n, (m,), generator=gen, device=store.reps.device)
    return store.reps[rows, torch.randint(v, (m,), generator=gen, device=store.reps.device)], rows


@torch.no_grad()
def evaluate(params: Params, model: RDM, ema: EMA | None, store: RepStore, ref: tuple[np.ndarray, np.ndarray],
             device: torch.device) -> dict:
    """Fréchet distance of M generated reps to the whole store, next to the lower bound: the FD of M reps drawn
    i.i.d. from the store itself, i.e. what a perfect model of the store scores (the paper's 0.48 generated vs
    0.38 real on ImageNet). FD sees only mean and covariance, so the FD of a plain Gaussian fit and the k-NN
    precision/recall (which see the shape of the distribution) are reported beside it.

    The real draws are with replacement, as a generator's samples are independent: M distinct images out of N
    would be a finite-population sample whose FD shrinks as M approaches N (at M = N/2 by ~40%), a bound no
    sampler can reach. The bound is averaged over ``lower_bound_draws`` draws and reported with its spread,
    which is also about the spread of the single generated draw.
    """
    cfg, ev = params.rdm, params.rdm.eval
    n, v, dim = store.shape
    m = ev.num_samples
    if m <= ev.prc_k:
        raise RcgError(f"rdm.eval.num_samples ({m}) must exceed rdm.eval.prc_k ({ev.prc_k})")
    gen = seeded(device, params.seed, 3)
    real, rows = draw_reps(store, m, gen)  # its labels are what the generated reps are conditioned on
    bank = None
    if cfg.model.class_cond:  # k-NN bank: view 0 of the images not drawn; checked before the costly sampling
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[rows] = False
        if keep.sum() < ev.knn_k:
            raise RcgError(f"rdm.eval.num_samples ({m}) leaves fewer than rdm.eval.knn_k ({ev.knn_k}) of the "
                           f"store's {n} images undrawn for the k-NN class-agreement bank; lower it")
        bank = (store.reps[keep, 0], store.labels[keep])
    labels = store.labels[rows] if cfg.model.class_cond else torch.zeros_like(rows)

    diffusion = GaussianDiffusion(**cfg.diffusion.model_dump()).to(device)
    model.eval()
    samples = []
    scope = ema.swapped_in(model.net) if ema is not None else contextlib.nullcontext()
    bar = progress(total=m, desc="rdm samples", unit="rep")
    with scope:
        for i in range(0, m, ev.batch_size):
            y = labels[i:i + ev.batch_size]
            samples.append(sample_reps(model, diffusion, y, steps=cfg.sample.steps, eta=cfg.sample.eta,
                                       temperature=cfg.sample.temperature, generator=gen))
            bar.update(len(y))
    bar.close()
    fake = torch.cat(samples)
    if not torch.isfinite(fake).all():
        raise RcgError("rdm samples hold NaN/Inf: the model file is broken (check the training curve)")

    fd_gen = frechet_distance(*gaussian_stats(fake.cpu().numpy()), *ref)
    lows = [frechet_distance(*gaussian_stats(draw.cpu().numpy()), *ref)
            for draw in [real] + [draw_reps(store, m, gen)[0] for _ in range(ev.lower_bound_draws - 1)]]
    fd_low = float(np.mean(lows))
    gaussians = gaussian_draws(ref, m, ev.lower_bound_draws, gen, device)
    gaussian = [frechet_distance(*gaussian_stats(draw.cpu().numpy()), *ref) for draw in gaussians]
    others, _ = draw_reps(store, m, gen)  # P/R reference: a third, independent draw
    precision, recall = knn_precision_recall(others, fake, k=ev.prc_k)
    precision_real, recall_real = knn_precision_recall(others, real, k=ev.prc_k)
    precision_gaussian, recall_gaussian = knn_precision_recall(others, gaussians[0], k=ev.prc_k)
    out = {"fd_generated": fd_gen, "fd_lower_bound": fd_low, "fd_lower_bound_std": float(np.std(lows)),
           "ratio": fd_gen / fd_low, "fd_gaussian_fit": float(np.mean(gaussian)),
           "precision": precision, "recall": recall, "precision_real": precision_real, "recall_real": recall_real,
           "precision_gaussian_fit": precision_gaussian, "recall_gaussian_fit": recall_gaussian,
           "num_samples": m, "prc_k": ev.prc_k,
           "reference": f"Gaussian fit to all {n} x {v} store reps",
           "lower_bound": f"mean over {len(lows)} draws of {m} store reps drawn i.i.d. (with replacement), "
                          "vs the reference",
           "gaussian_fit": f"the same for {m} samples of the reference Gaussian itself (a model of mean and "
                           "covariance only), mean over as many draws",
           "precision_recall": f"k-NN (k={ev.prc_k}) precision/recall of the generated reps (_real: the lower "
                               "bound's first draw; _gaussian_fit: the Gaussian's first draw) against another "
                               f"i.i.d. draw of {m} store reps; two draws from one store share some reps, which "
                               "lifts _real a little",
           "weights": "ema" if ema is not None else "raw",
           "sample": params.section("rdm")["sample"], "generated_std": fake.std(dim=1).mean().item()}
    if bank is not None:  # queries: the samples / the real draws, each with its requested (true) class
        bank, bank_labels = bank
        out["class_agreement"] = knn_accuracy(bank, bank_labels, k=ev.knn_k, queries=fake, query_labels=labels)
        out["class_agreement_real"] = knn_accuracy(bank, bank_labels, k=ev.knn_k, queries=real, query_labels=labels)
        out["knn_k"] = ev.knn_k
        out["classes_requested"] = int(labels.unique().numel())
    return out


# ------------------------------------------------------------------------------------------------- run
def run(params: Params) -> dict:
    d = distributed.init()
    device = device_for(params.runtime, d.local_rank)
    started = time.perf_counter()
    store = load_store(params, device)
    stats = store_stats(store.reps)
    if params.rdm.checkpoint is not None:
        if d.world > 1:
            raise RcgError("importing rdm.checkpoint needs no torchrun: run it on one process")
        model, ema, kwargs, summary = import_official(params, store, device)
    else:
        model, ema, kwargs, summary = train(params, store, stats, device, d)
    if not d.is_main:
        return {"rank": d.rank, **summary}

    tic = time.perf_counter()
    metrics = evaluate(params, model, ema, store, stats, device)  # before writing: both outputs appear together
    summary["eval_seconds"] = round(time.perf_counter() - tic, 2)
    rdm = params.section("rdm")
    config = {"model": kwargs, "diffusion": rdm["diffusion"], "sample": rdm["sample"], "store": store.identity,
              "whitening": {k: rdm["model"][k] for k in ("whiten_power", "whiten_eps")},
              "min_snr_gamma": None if summary["source"] == "official" else rdm["train"]["min_snr_gamma"]}
    out_path, metrics_path = params.paths.models / "rdm.pt", params.paths.metrics / "rdm.json"
    save_model_file(out_path, FORMAT, config, model.state_dict(), ema.state_dict() if ema is not None else None,
                    summary)
    write_json(metrics_path, {**metrics, **{k: summary[k] for k in ("source", "encoder_check") if k in summary}})
    log(f"train_rdm: FD generated {metrics['fd_generated']:.4f} vs lower bound {metrics['fd_lower_bound']:.4f} "
        f"(ratio {metrics['ratio']:.3f}; Gaussian fit {metrics['fd_gaussian_fit']:.4f}), precision "
        f"{metrics['precision']:.3f} recall {metrics['recall']:.3f} (real reps: {metrics['precision_real']:.3f} / "
        f"{metrics['recall_real']:.3f})")
    return {"output": str(out_path), "metrics": str(metrics_path), **summary,
            **{k: metrics[k] for k in ("fd_generated", "fd_lower_bound", "ratio", "precision", "recall",
                                       "class_agreement") if k in metrics},
            "seconds": round(time.perf_counter() - started, 2)}
