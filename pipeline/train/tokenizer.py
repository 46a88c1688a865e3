"""The tokenizer's recipe: taming-transformers' VQGAN training minus LPIPS (no VGG weights here): pixel L1/L2 +
commitment loss, a hinge PatchGAN switched on at ``disc_start`` with its own optimiser, both Adam(0.5, 0.9), on the
shared loop (resumable), which makes both updates (TrainLoop.update) and averages both models' gradients across ranks
by DDP (TrainLoop.wrap). The quantiser stays the official plain nearest-L2 one; the codebook learns by EMA k-means
(pipeline.models.vqgan.CodebookEMA) and codes unused over ``restart_every`` steps restart onto current encoder
outputs (after step 0 too: a data-based init)."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader

from pipeline.core.config import Params
from pipeline.core.distributed import Dist
from pipeline.core.errors import RcgError
from pipeline.core.rng import stream_seed
from pipeline.data.shards import ShardSet
from pipeline.data.tokenizer_data import RandomCrops
from pipeline.models.vqgan import VQGAN, CodebookEMA, VectorQuantizer, code_usage, codebook_stats, model_kwargs
from pipeline.models.vqgan_loss import RealFakeLogits, VQGANLoss
from pipeline.data.batches import StepBatches
from pipeline.train.loop import TrainLoop
from pipeline.train.schedules import warmup_cosine

STAGE = "train_tokenizer"
CURVES = ["loss", "rec", "q", "g", "d", "usage", "perplexity"]


def _all_reduce_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` over ranks in place: the codebook EMA's statistics and the code counts (DDP averages gradients)."""
    if d.world > 1:
        tdist.all_reduce(t)
    return t


def train(params: Params, identity: dict, d: Dist, device: torch.device) -> tuple[VQGAN, dict]:
    """Train (or resume, under ``identity``) the VQGAN on the shards; -> (model, summary). Every rank returns after
    the last step's barrier."""
    tk, tr = params.tokenizer, params.tokenizer.train
    kwargs = model_kwargs(tk.model)
    n_embed = kwargs["n_embed"]
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = VQGAN(**kwargs).to(device)
    if params.views.crop % model.downsample_factor:
        raise RcgError(f"views.crop ({params.views.crop}) must be a multiple of the tokenizer's downsampling "
                       f"factor {model.downsample_factor} (tokenizer.model.ch_mult)")
    if params.views.crop < 3 * 2 ** tr.disc_layers:  # the PatchGAN's last two 4x4 convs need >= 1 output
        raise RcgError(f"views.crop ({params.views.crop}) is too small for tokenizer.train.disc_layers "
                       f"({tr.disc_layers}): it needs crops of at least {3 * 2 ** tr.disc_layers}")
    shards = ShardSet(params.paths.shards, "train")
    loss_fn = VQGANLoss(tr.disc_start, tr.disc_weight, tr.codebook_weight, tr.pixel_l1_weight, tr.pixel_l2_weight,
                        disc_ndf=tr.disc_ndf, disc_num_layers=tr.disc_layers).to(device)
    disc = loss_fn.discriminator
    codebook = model.quantize.embedding.weight.requires_grad_(False)  # moved by EMA, not by the optimiser
    ema = CodebookEMA(model.quantize).to(device)
    cuda = device.type == "cuda"
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tr.lr, betas=(0.5, 0.9),
                             fused=cuda)
    opt_d = torch.optim.Adam(disc.parameters(), lr=tr.lr, betas=(0.5, 0.9), fused=cuda)
    loop = TrainLoop.from_section(STAGE, params, tr, d, device, steps=tr.steps, identity=identity,
                                  modules={"model": model, "ema": ema, "disc": disc, "opt_g": opt_g, "opt_d": opt_d},
                                  lr=warmup_cosine(tr.lr, tr.steps) if tr.cosine else None,
                                  lr_optimizers=(opt_g, opt_d))
    counts = loop.extra.get("counts", torch.zeros(n_embed, dtype=torch.long)).to(device)  # since the last restart
    win_counts = loop.extra.get("win_counts", torch.zeros_like(counts)).to(device)  # since the last log
    sampler = StepBatches(len(shards), tr.batch_size, params.seed, loop.start, tr.steps, d.rank, d.world,
                          key="tokenizer.train.batch_size")
    loader = DataLoader(RandomCrops(shards, params.views.crop, params.seed), batch_sampler=sampler,
                        num_workers=tr.workers, pin_memory=cuda, prefetch_factor=4 if tr.workers else None)
    net = loop.wrap(model)
    # D's step is one forward call (its real and fake passes) and one backward: a DDP pattern. D stays eager.
    net_d = loop.wrap(RealFakeLogits(disc), compile=False)
    latent = {}  # the quantiser's input, for the EMA and restarts
    model.quantize.register_forward_hook(lambda m, args, out: latent.update(z=args[0].detach()))
    reduce = lambda t: _all_reduce_(t, d)  # noqa: E731

    def step(batch: torch.Tensor, it: int) -> dict:
        """One generator update (+ codebook EMA), one discriminator update from ``disc_start``, code restarts."""
        x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        with loop.autocast():
            xrec, qloss, idx = net(x)
            disc.requires_grad_(False)  # the generator's GAN term calls the bare D: no gradients for D, no DDP
            loss, logs = loss_fn.generator_loss(x, xrec, qloss, it, model.get_last_layer())
        loop.update(opt_g, loss)
        z_flat = latent["z"].permute(0, 2, 3, 1).reshape(-1, latent["z"].shape[1]).float()
        ema.update(codebook, z_flat, idx.flatten(), reduce)
        d_loss = 0.0
        if it >= tr.disc_start:
            disc.requires_grad_(True)
            with loop.autocast():
                d_loss_t, dlogs = loss_fn.discriminator_loss(x, xrec, it, net_d)
            loop.update(opt_d, d_loss_t)
            d_loss = dlogs["d_loss"]
        step_counts = reduce(code_usage(idx, n_embed))
        counts.add_(step_counts)
        win_counts.add_(step_counts)
        if tr.restart_every and (it == 0 or (it + 1) % tr.restart_every == 0):  # it 0: a data-based init
            restart = stream_seed(params.seed, "tokenizer.restart", it)
            restart_dead_codes(model.quantize, ema, z_flat, counts, d, restart)
            counts.zero_()
        return {"loss": logs["loss"], "rec": logs["rec_loss"], "q": logs["q_loss"], "g": logs["g_loss"], "d": d_loss}

    def on_log(step: int, means: dict) -> dict:
        stats = codebook_stats(win_counts.cpu())
        win_counts.zero_()
        return stats

    model.train()
    result = loop.run(step, loader, on_log=on_log,
                      extra_state=lambda: {"counts": counts.cpu(), "win_counts": win_counts.cpu()})
    d.barrier()
    return model, {"source": "trained", **result, "final": {k: round(v, 6) for k, v in loop.final.items()}}


@torch.no_grad()
def restart_dead_codes(quantizer: VectorQuantizer, ema: CodebookEMA, z_flat: torch.Tensor, counts: torch.Tensor,
                       d: Dist, seed: int) -> int:
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
