"""What a preset's ``dvc repro`` costs, from FLOPs: no GPU needed, nothing timed.

    python -m bench.preset_cost folder --images 50000 [--tflops 100] [--set views.crop=128 ...]
    python -m bench.preset_cost --params params.yaml --images 20000

Each stage's model is built from the params as its stage builds it (random weights: a step's cost does not depend
on them) and torch's FLOP counter (matmuls, convolutions, attention; not norms, activations or optimisers) counts
one item of its work on the CPU: a MoCo v3 step per image (two views, base forward and backward, momentum forward),
one VQGAN step per crop (with and without the PatchGAN's updates, before and after ``disc_start``), one RDM or
MAGE step per sample, one view through the encoder or the VQGAN encoder, one generated image (RDM passes, decoding
passes, VQGAN decode). The item counts come from the params and ``--images`` (the folder's image count; the train
split is what ``data.holdout`` leaves of it). GPU-hours assume ``--tflops`` sustained: a figure to scale by the rate
``bash bench/gpu_check.sh`` measures, not a measurement. Data loading, the k-NN probes, evaluations and figures
are left out.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.core.config import Params, load_params, preset  # noqa: E402
from pipeline.models.diffusion import GaussianDiffusion  # noqa: E402
from pipeline.losses.diffusion import x0_loss  # noqa: E402
from pipeline.models.encoder import build_encoder, represent  # noqa: E402
from pipeline.models.mage import MAGE, mage_kwargs, masked_token_loss  # noqa: E402
from pipeline.models.moco import MoCoV3  # noqa: E402
from pipeline.models.rdm import RDM, rdm_kwargs  # noqa: E402
from pipeline.models.ssl_judge import SslJudgeMoCo, build_ssl_judge, model_config  # noqa: E402
from pipeline.models.vqgan import VQGAN, model_kwargs  # noqa: E402
from pipeline.models.vqgan_loss import VQGANLoss  # noqa: E402

DEFAULT_SETTINGS = ("rcg", "rcg_cfg", "baseline", "oracle")  # what dvc.yaml's generation list samples


@dataclass
class Row:
    """One stage: what it does, GFLOP per item, and how many items a run of the params holds."""
    stage: str
    work: str
    gflop_per_item: float
    items: float

    @property
    def pflop(self) -> float:
        return self.gflop_per_item * self.items / 1e6


def gflop(fn: Callable[[], object], per: int = 1) -> float:
    """GFLOPs of one call of ``fn``, divided by the ``per`` items it handles."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9 / per


def train_images(params: Params, images: int) -> int:
    """The train split a folder of ``images`` files leaves (data.holdout goes to val when there is no val_folder);
    the built-in set's own count when the params use it."""
    if params.data.source == "builtin":
        return params.data.builtin.num_train
    if params.data.val_folder is not None:
        return images
    return images - max(1, round(images * params.data.holdout)) if params.data.holdout else images


def encoder_rows(params: Params, n: int) -> list[Row]:
    m, t, views = params.encoder.model, params.encoder.train, params.views
    torch.manual_seed(0)
    base = build_encoder(m.model_dump())
    arch = (f"ViT {m.embed_dim}x{m.depth} at {m.img_size}/{m.patch_size}" if m.arch == "vit" else
            f"ResNet {m.resnet.block} {m.resnet.layers} width {m.resnet.width} at {m.img_size}")
    rows = []
    if params.encoder.checkpoint is None:
        moco = MoCoV3(base, dim=m.proj_dim, mlp_dim=m.proj_hidden_dim, T=t.temperature).train()
        x = torch.rand(2, 3, m.img_size, m.img_size)
        step = gflop(lambda: moco(x, x.clone(), 0.99).backward(), per=2)
        steps = t.epochs * (n // t.batch_size)
        rows.append(Row("pretrain_encoder", f"{steps} steps x {t.batch_size} images, 2 views, {arch}", step,
                        steps * t.batch_size))
    else:
        rows.append(Row("pretrain_encoder", "import encoder.checkpoint", 0.0, 0))
    base.eval()
    with torch.inference_mode():
        view = gflop(lambda: represent(base, torch.rand(1, 3, views.crop, views.crop), m.img_size))
    rows.append(Row("encode", f"{n} images x {views.count} views", view, n * views.count))
    return rows


def tokenizer_rows(params: Params, n: int) -> tuple[list[Row], VQGAN]:
    tk, t, crop, views = params.tokenizer, params.tokenizer.train, params.views.crop, params.views
    torch.manual_seed(0)
    model = VQGAN(**model_kwargs(tk.model))
    rows = []
    if tk.checkpoint is None:
        loss_fn = VQGANLoss(t.disc_start, t.disc_weight, t.codebook_weight, t.pixel_l1_weight, t.pixel_l2_weight,
                            disc_ndf=t.disc_ndf, disc_num_layers=t.disc_layers)
        x = torch.rand(2, 3, crop, crop)

        def step(it: int) -> None:
            """The recipe's step (pipeline/train/tokenizer.py) at iteration ``it``: the generator's update, then the
            discriminator's from disc_start."""
            xrec, qloss, _ = model(x)
            loss, _ = loss_fn.generator_loss(x, xrec, qloss, it, model.get_last_layer())
            loss.backward()
            d_loss, _ = loss_fn.discriminator_loss(x, xrec, it)
            if it >= t.disc_start:
                d_loss.backward()

        before, after = gflop(lambda: step(0), per=2), gflop(lambda: step(t.disc_start), per=2)
        plain = min(t.disc_start, t.steps)
        mean = (plain * before + (t.steps - plain) * after) / t.steps
        rows.append(Row("train_tokenizer", f"{t.steps} steps x {t.batch_size} crops at {crop} (GAN from step "
                        f"{t.disc_start}: {before:.0f} / {after:.0f} GFLOP)", mean, t.steps * t.batch_size))
    else:
        rows.append(Row("train_tokenizer", "import tokenizer.checkpoint", 0.0, 0))
    model.eval()
    with torch.inference_mode():
        view = gflop(lambda: model.encode_to_indices(torch.rand(1, 3, crop, crop)))
    rows.append(Row("tokenize", f"{n} images x {views.count} views", view, n * views.count))
    return rows, model


def rdm_rows(params: Params) -> tuple[list[Row], RDM]:
    r = params.rdm
    torch.manual_seed(0)
    model = RDM(**rdm_kwargs(r.model)).train()
    model.cond_stage_model.requires_grad_(False)
    diffusion = GaussianDiffusion()
    x0, y = torch.randn(2, r.model.in_channels), torch.zeros(2, dtype=torch.long)
    step = gflop(lambda: x0_loss(diffusion, model, x0, y, torch.Generator().manual_seed(0),
                                                 min_snr_gamma=r.train.min_snr_gamma).backward(), per=2)
    work = [] if r.checkpoint is not None else [
        Row("train_rdm", f"{r.train.steps} steps x {r.train.batch_size} reps, MLP {r.model.model_channels}x"
            f"{r.model.num_res_blocks}", step, r.train.steps * r.train.batch_size)]
    return work or [Row("train_rdm", "import rdm.checkpoint", 0.0, 0)], model.eval()


def pixel_rows(params: Params, tokenizer: VQGAN) -> tuple[list[Row], MAGE]:
    p, crop = params.pixel, params.views.crop
    side = crop // tokenizer.downsample_factor
    torch.manual_seed(0)
    model = MAGE(**mage_kwargs(p.model, params.tokenizer.model.n_embed, side * side, params.encoder.model.proj_dim,
                               "rep")).train()
    tokens = torch.randint(0, params.tokenizer.model.n_embed, (2, side * side))
    reps = torch.randn(2, params.encoder.model.proj_dim)
    step = gflop(lambda: masked_token_loss(model, tokens, reps, torch.Generator().manual_seed(0))[0].backward(), per=2)
    m = p.model
    rows = [Row(f"train_pixel@{cond}", f"{p.train.steps} steps x {p.train.batch_size}, MAGE {m.embed_dim}x{m.depth} "
                f"+ {m.decoder_embed_dim}x{m.decoder_depth} on {side}x{side} tokens",
                0.0 if p.checkpoints[cond] is not None else step,
                0 if p.checkpoints[cond] is not None else p.train.steps * p.train.batch_size)
            for cond in p.conditionings]
    return rows, model.eval()


def sample_rows(params: Params, rdm: RDM, mage: MAGE, tokenizer: VQGAN) -> list[Row]:
    """One image of each default setting: the RDM's DDIM passes (RCG settings), one MAGE pass per decoding step
    (two rows under guidance), one VQGAN decode; as bench/gpu_check.py counts RCG-B's."""
    s = params.sample
    side = int(math.isqrt(mage.seq_len))
    for model in (rdm, mage, tokenizer):
        model.requires_grad_(False)
    with torch.inference_mode():
        rdm_pass = gflop(lambda: rdm(torch.randn(1, params.rdm.model.in_channels), torch.ones(1, dtype=torch.long)))
        ids = torch.full((2, mage.seq_len), mage.mask_id)
        mage_row = gflop(lambda: mage(ids, mage.null_condition(2)), per=2)
        decode = gflop(lambda: tokenizer.decode_indices(torch.zeros(1, side, side, dtype=torch.long)))
    rows = []
    for name in DEFAULT_SETTINGS:
        setting = s.settings[name]
        rdm_cost = s.rdm.steps * rdm_pass if setting.reps == "rdm" else 0.0
        per_image = rdm_cost + setting.iterations * (2 if setting.guidance else 1) * mage_row + decode
        rows.append(Row(f"sample@{name}", f"{s.num_samples} images, {setting.iterations} decoding steps"
                        + (", guided" if setting.guidance else "") + (f", RDM {s.rdm.steps} steps" if rdm_cost else ""),
                        per_image, s.num_samples))
    return rows


def ssl_judge_rows(params: Params, n: int) -> list[Row]:
    if "ssl_judge" not in params.score.ssl_spaces:
        return []
    j, crop, arch = params.ssl_judge, params.views.crop, params.ssl_judge_arch()
    torch.manual_seed(0)
    base = build_ssl_judge(model_config(params))
    moco = SslJudgeMoCo(base, j.model.proj_hidden_dim, j.model.proj_dim, j.train.temperature).train()
    x = torch.rand(2, 3, crop, crop)
    step = gflop(lambda: moco(x, x.clone(), 0.99).backward(), per=2)
    v = j.model.vit
    network = (f"ViT {v.embed_dim}x{v.depth} at {crop}/{v.patch_size}" if arch == "vit" else
               f"CNN width {j.model.width}, {j.model.stages} stages")
    return [Row("train_ssl_judge@ssl_judge", f"{j.train.epochs} epochs x {n} images, {network}", step,
                j.train.epochs * n)]


def costs(params: Params, images: int) -> list[Row]:
    """Every stage's row for a run of ``params`` on a folder of ``images`` files (train split: what holdout leaves)."""
    n = train_images(params, images)
    with torch.random.fork_rng():
        rows = encoder_rows(params, n)
        tokenizer_work, tokenizer = tokenizer_rows(params, n)
        rdm_work, rdm = rdm_rows(params)
        pixel_work, mage = pixel_rows(params, tokenizer)
        return (rows + rdm_work + tokenizer_work + pixel_work + ssl_judge_rows(params, n)
                + sample_rows(params, rdm, mage, tokenizer))


def table(rows: list[Row], tflops: float) -> list[str]:
    out = [f"| stage | work | GFLOP per item | PFLOP | hours at {tflops:g} TFLOP/s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        hours = r.pflop * 1e15 / (tflops * 1e12) / 3600
        out.append(f"| {r.stage} | {r.work} | {r.gflop_per_item:.3g} | {r.pflop:.3g} | {hours:.2f} |")
    total = sum(r.pflop for r in rows)
    out.append(f"| all | | | {total:.3g} | {total * 1e15 / (tflops * 1e12) / 3600:.2f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", help="a preset name (pipeline/presets); else --params")
    ap.add_argument("--params", type=Path, default=None, help="a params file instead of a preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as rcg's --set")
    ap.add_argument("--images", type=int, default=50000, help="image files in the folder (default 50000)")
    ap.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s per GPU (default 100)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the counting passes")
    args = ap.parse_args(argv)
    if (args.preset is None) == (args.params is None):
        ap.error("give a preset name or --params FILE (one of them)")
    params = (preset(args.preset, args.overrides) if args.preset is not None
              else load_params(args.params, args.overrides))
    torch.set_num_threads(args.threads)
    rows = costs(params, args.images)
    print(f"{args.preset or args.params}, {args.images} images ({train_images(params, args.images)} train), "
          f"views {params.views.count} x {params.views.crop} px")
    print("\n".join(table(rows, args.tflops)))


if __name__ == "__main__":
    main()
