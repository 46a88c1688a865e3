"""Stage ``train_rdm``: the Representation Diffusion Model, trained on the cached ``reps.zarr`` and evaluated.

Reads the store into memory (``pipeline.data.rep_store``), trains the RDM on it or, with ``rdm.checkpoint``
set, imports an official one (``pipeline.models.rdm.load_official_rdm_model``), scores its samples
(``pipeline.eval.rdm_eval``) and writes ``rdm.pt`` and ``metrics/rdm.json``. The reps are mapped into the RDM's
(optionally whitened) space on the way in, and samples back on the way out.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.core import distributed
from pipeline.core.artifacts import save_model_file, write_json
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.core.progress import log, progress
from pipeline.core.runtime import device_for
from pipeline.data.rep_store import RepBatches, RepStore, load_store, store_stats
from pipeline.eval.rdm_eval import evaluate
from pipeline.gen.diffusion import GaussianDiffusion
from pipeline.models.rdm import MODEL_FORMAT, RDM, load_official_rdm_model, rdm_kwargs
from pipeline.train.ema import EMA
from pipeline.train.state import CurveLog, TrainState, check_finite, cosine_lr, set_lr

STAGE = "train_rdm"


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


# ------------------------------------------------------------------------------------------------- run
def run(params: Params) -> dict:
    d = distributed.init()
    device = device_for(params.runtime, d.local_rank)
    started = time.perf_counter()
    store = load_store(params.paths.reps, params.rdm.model, device)
    stats = store_stats(store.reps)
    if params.rdm.checkpoint is not None:
        if d.world > 1:
            raise RcgError("importing rdm.checkpoint needs no torchrun: run it on one process")
        model, ema, kwargs, summary = load_official_rdm_model(params.rdm.checkpoint, params.rdm.model,
                                                              params.rdm.diffusion, store.identity,
                                                              str(store.path), device)
    else:
        model, ema, kwargs, summary = train(params, store, stats, device, d)
    if not d.is_main:
        return {"rank": d.rank, **summary}

    tic = time.perf_counter()
    metrics = evaluate(params.rdm, params.seed, model, ema, store, stats, device)  # both outputs appear together
    summary["eval_seconds"] = round(time.perf_counter() - tic, 2)
    rdm = params.section("rdm")
    config = {"model": kwargs, "diffusion": rdm["diffusion"], "sample": rdm["sample"], "store": store.identity,
              "whitening": {k: rdm["model"][k] for k in ("whiten_power", "whiten_eps")},
              "min_snr_gamma": None if summary["source"] == "official" else rdm["train"]["min_snr_gamma"]}
    out_path, metrics_path = params.paths.models / "rdm.pt", params.paths.metrics / "rdm.json"
    save_model_file(out_path, MODEL_FORMAT, config, model.state_dict(), ema.state_dict() if ema is not None else None,
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
