"""Stage ``train_tokenizer``: import the official VQGAN, or train one on the shards -> data/models/tokenizer.pt.

Training follows taming-transformers minus LPIPS (no VGG weights here): pixel L1/L2 + commitment loss, a hinge
PatchGAN switched on at ``disc_start`` with its own optimiser, both Adam(0.5, 0.9). The quantiser stays the official
plain nearest-L2 one, so the file loads into the same class and tokenizes the same way; only how the codebook
learns differs: by EMA k-means (pipeline.models.vqgan.CodebookEMA) instead of a codebook loss, and codes unused over the
last ``restart_every`` steps are restarted onto current encoder outputs (after step 0 too: a data-based init).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core import distributed
from pipeline.core.artifacts import file_sha256, save_model_file
from pipeline.core.config import Params
from pipeline.core.errors import RcgError
from pipeline.data.images import decode_rgb, resize_short_side
from pipeline.core.progress import log, progress
from pipeline.core.runtime import device_for
from pipeline.data.shards import ShardSet
from pipeline.train.state import CurveLog, TrainState, check_finite, seed_everything, unwrap
from pipeline.models.vqgan import ARCH, MODEL_FORMAT as FORMAT, model_kwargs
from pipeline.models.vqgan import (VQGAN, CodebookEMA, VectorQuantizer, code_usage, codebook_stats, infer_vqgan_config,
                            load_official_vqgan)
from pipeline.models.vqgan_loss import VQGANLoss

CURVES = ["loss", "rec", "q", "g", "d", "usage", "perplexity"]


def _seed(*parts: int) -> int:
    """An independent 63-bit seed per (seed, stream, index): no global RNG, so batches survive resume."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class RandomCrops(Dataset):
    """Item ``(idx, k)``: image ``idx`` with its short side resized to ``crop`` (taming's rescaler), then a random
    ``crop`` square and a coin-flip mirror drawn from (seed, k). uint8 [crop, crop, 3]."""

    def __init__(self, shards: ShardSet, crop: int, seed: int):
        self.shards, self.crop, self.seed = shards, crop, seed

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        idx, k = item
        img = resize_short_side(decode_rgb(self.shards.read(idx)), self.crop)
        rng = np.random.default_rng(_seed(self.seed, 1, k))
        w, h = img.size
        left, top = int(rng.integers(w - self.crop + 1)), int(rng.integers(h - self.crop + 1))
        out = np.asarray(img.crop((left, top, left + self.crop, top + self.crop)))
        if rng.integers(2):
            out = out[:, ::-1]
        return torch.from_numpy(out.copy())


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Step ``s`` takes positions [s*B, (s+1)*B) of an endless chain of seeded epoch permutations, and rank ``r``
    its r-th slice: a pure function of (seed, step), so a resumed run sees the batches it would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int, world: int):
        self.n, self.batch, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.per, self.rank = batch_size // world, rank

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        epoch, perm = -1, None
        for step in range(self.start, self.stop):
            first = step * self.batch + self.rank * self.per
            items = []
            for k in range(first, first + self.per):
                if k // self.n != epoch:
                    epoch = k // self.n
                    perm = np.random.default_rng(_seed(self.seed, 0, epoch)).permutation(self.n)
                items.append((int(perm[k % self.n]), k))
            yield items


def import_official(params: Params, out: Path) -> dict:
    """Check the official file against ``tokenizer.model`` field by field, then save it as an rcg model file."""
    path = params.tokenizer.checkpoint
    model = load_official_vqgan(path)
    inferred = infer_vqgan_config(model.state_dict())
    inferred["ch_mult"] = list(inferred["ch_mult"])
    wanted = model_kwargs(params.tokenizer.model)
    diffs = [f"{k}: file {inferred[k]} vs params {wanted[k]}" for k in ARCH if inferred[k] != wanted[k]]
    if diffs:
        raise RcgError(f"{path} does not match tokenizer.model ({'; '.join(diffs)}); "
                       f"set tokenizer.model to the file's architecture")
    summary = {"source": "official", "checkpoint": str(path), "sha256": file_sha256(path)}
    save_model_file(out, FORMAT, {"model": wanted}, model.state_dict(), summary=summary)
    return {"output": str(out), **summary, "model": wanted}


def _all_reduce_(t: torch.Tensor, d: distributed.Dist) -> torch.Tensor:
    if d.world > 1:
        tdist.all_reduce(t)
    return t


def train(params: Params, out: Path) -> dict:
    tk, tr = params.tokenizer, params.tokenizer.train
    d = distributed.init()
    device = device_for(params.runtime, d.local_rank)
    if tr.batch_size % d.world:
        raise RcgError(f"tokenizer.train.batch_size ({tr.batch_size}) must be divisible by the {d.world} ranks")
    kwargs = model_kwargs(tk.model)
    n_embed = kwargs["n_embed"]
    seed_everything(params.seed)
    model = VQGAN(**kwargs).to(device)
    if params.views.crop % model.downsample_factor:
        raise RcgError(f"views.crop ({params.views.crop}) must be a multiple of the tokenizer's downsampling "
                       f"factor {model.downsample_factor} (tokenizer.model.ch_mult)")
    if params.views.crop < 3 * 2 ** tr.disc_layers:  # the PatchGAN's last two 4x4 convs need >= 1 output
        raise RcgError(f"views.crop ({params.views.crop}) is too small for tokenizer.train.disc_layers "
                       f"({tr.disc_layers}): it needs crops of at least {3 * 2 ** tr.disc_layers}")
    loss_fn = VQGANLoss(tr.disc_start, tr.disc_weight, tr.codebook_weight, tr.pixel_l1_weight, tr.pixel_l2_weight,
                        disc_ndf=tr.disc_ndf, disc_num_layers=tr.disc_layers).to(device)
    disc = loss_fn.discriminator
    codebook = model.quantize.embedding.weight.requires_grad_(False)  # moved by EMA, not by the optimiser
    ema = CodebookEMA(model.quantize).to(device)
    cuda = device.type == "cuda"
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tr.lr, betas=(0.5, 0.9),
                             fused=cuda)
    opt_d = torch.optim.Adam(disc.parameters(), lr=tr.lr, betas=(0.5, 0.9), fused=cuda)
    config = {"seed": params.seed, "crop": params.views.crop, "model": kwargs,
              "train": params.section("tokenizer")["train"]}
    for k in ("checkpoint_every", "log_every", "workers"):  # how to run, not what to compute
        config["train"].pop(k)
    state = TrainState(params.paths.state / "train_tokenizer.pt", config)
    modules = {"model": model, "ema": ema, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}
    start, extra = state.load(modules)
    counts = extra.get("counts", torch.zeros(n_embed, dtype=torch.long)).to(device)  # since the last restart
    final = extra.get("final", {})  # the last logged figures, for the model file's summary

    shards = ShardSet(params.paths.shards, "train")
    sampler = StepBatches(len(shards), tr.batch_size, params.seed, start, tr.steps, d.rank, d.world)
    loader = DataLoader(RandomCrops(shards, params.views.crop, params.seed), batch_sampler=sampler,
                        num_workers=tr.workers, pin_memory=cuda,
                        prefetch_factor=4 if tr.workers else None)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if d.world > 1 else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if tr.bf16 and cuda else contextlib.nullcontext()
    latent = {}  # the quantiser's input, for the EMA and restarts
    model.quantize.register_forward_hook(lambda m, args, out: latent.update(z=args[0].detach()))
    reduce = lambda t: _all_reduce_(t, d)  # noqa: E731
    curves = CurveLog(params.paths.plots / "train_tokenizer.csv", CURVES, start) if d.is_main else None
    window, win_counts = defaultdict(float), torch.zeros_like(counts)
    restarts, t0 = 0, time.perf_counter()
    model.train()
    for step, batch in zip(range(start, tr.steps), progress(loader, total=len(sampler), desc="train_tokenizer",
                                                             unit="step")):
        x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        with amp:
            xrec, qloss, idx = ddp(x)
            disc.requires_grad_(False)  # the generator step must not touch D's gradients
            loss, logs = loss_fn.generator_loss(x, xrec, qloss, step, unwrap(model).get_last_layer())
        check_finite(loss, step, "train_tokenizer", state)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        z_flat = latent["z"].permute(0, 2, 3, 1).reshape(-1, latent["z"].shape[1]).float()
        ema.update(codebook, z_flat, idx.flatten(), reduce)
        logs["d_loss"] = 0.0
        if step >= tr.disc_start:
            disc.requires_grad_(True)
            with amp:
                d_loss, dlogs = loss_fn.discriminator_loss(x, xrec, step)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if d.world > 1:  # D runs thrice per step (not a DDP pattern), so its gradients are averaged by hand
                for p in disc.parameters():
                    reduce(p.grad).div_(d.world)
            opt_d.step()
            logs["d_loss"] = dlogs["d_loss"]
        step_counts = reduce(code_usage(idx, n_embed))
        counts += step_counts
        win_counts += step_counts
        for key, name in [("loss", "loss"), ("rec_loss", "rec"), ("q_loss", "q"), ("g_loss", "g"), ("d_loss", "d")]:
            window[name] += logs[key]
        window["n"] += 1

        if tr.restart_every and (step == 0 or (step + 1) % tr.restart_every == 0):  # step 0: data-based init
            restarts += restart_dead_codes(model.quantize, ema, z_flat, counts, d, _seed(params.seed, 2, step))
            counts.zero_()
        if (step + 1) % tr.log_every == 0 or step + 1 == tr.steps:
            final = {k: distributed.all_mean(v / window["n"], d, device) for k, v in window.items() if k != "n"}
            final.update(codebook_stats(win_counts.cpu()))
            if curves is not None:
                curves.add(step + 1, **final)
            log(f"step {step + 1}/{tr.steps} " + " ".join(f"{k} {v:.4g}" for k, v in final.items())
                + f" restarted {restarts}")
            window, restarts = defaultdict(float), 0
            win_counts.zero_()
        if d.is_main and ((step + 1) % tr.checkpoint_every == 0 or step + 1 == tr.steps):
            state.save(step + 1, modules, {"counts": counts.cpu(), "final": final})
    d.barrier()
    elapsed = time.perf_counter() - t0
    summary = {"source": "trained", "steps": tr.steps, "resumed_from": start,
               "final": {k: round(v, 6) for k, v in final.items()}}
    if d.is_main:
        save_model_file(out, FORMAT, {"model": kwargs}, unwrap(model).state_dict(), summary=summary)
    return {"output": str(out), **summary, "seconds": round(elapsed, 2),
            "steps_per_s": round((tr.steps - start) / max(elapsed, 1e-9), 2)}


@torch.no_grad()
def restart_dead_codes(quantizer: VectorQuantizer, ema: CodebookEMA, z_flat: torch.Tensor, counts: torch.Tensor,
                       d: distributed.Dist, seed: int) -> int:
    """Move codes unused since the last restart onto this step's encoder outputs. Rank 0 picks the places and
    broadcasts, so every rank keeps the same codebook; the seed depends on the step only, so resume repeats it."""
    weight = quantizer.embedding.weight
    if d.is_main:
        quantizer.restart_dead_codes(z_flat, counts, 1, torch.Generator().manual_seed(seed))
    if d.world > 1:
        tdist.broadcast(weight.data, 0)
    dead = (counts < 1).nonzero().flatten()
    ema.reset(weight, dead)
    return len(dead)


def run(params: Params) -> dict:
    out = params.paths.models / "tokenizer.pt"
    if params.tokenizer.checkpoint is not None:
        d = distributed.init()
        summary = import_official(params, out) if d.is_main else {"output": str(out)}
        d.barrier()
        return summary
    return train(params, out)
